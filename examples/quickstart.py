"""Optimize a train-form zoo model, print what fxopt did, and time it against eager PyTorch."""

import torch

import fxopt
from fxopt.bench import bench, format_rows

model = fxopt.models.create("resnet18_like")  # conv + batch norm everywhere, eval mode
(x,) = fxopt.models.example_inputs("resnet18_like", batch=1)

optimized = fxopt.optimize(model, x)  # capture, fold, verify every pass against the graph before it
print(optimized.report)

torch.testing.assert_close(optimized(x), model(x), rtol=1e-4, atol=1e-5)
print(format_rows(bench(["resnet18_like"], ["eager", "optimized"], progress=False)))
