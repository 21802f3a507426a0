"""Optimize a train-form zoo model, print what fxopt did, lower it through TVM, and time both
against eager PyTorch."""

import torch

import fxopt
from fxopt.bench import bench, format_rows

model = fxopt.models.create("resnet18_like")  # conv + batch norm everywhere, eval mode
(x,) = fxopt.models.example_inputs("resnet18_like", batch=1)

optimized = fxopt.optimize(model, x)  # capture, fold, verify every pass against the graph before it
print(optimized.report)
torch.testing.assert_close(optimized(x), model(x), rtol=1e-4, atol=1e-5)

generated = fxopt.optimize(model, x, backend="tvm")  # the same rewrites, then TVM code for this CPU
print("\n".join(note for note in generated.report.notes if note.startswith("tvm")))
torch.testing.assert_close(generated(x), model(x), rtol=1e-4, atol=1e-5)

print()
rows = bench(["resnet18_like"], ["eager", "optimized", "tvm"], threads=1, progress=False)
print(format_rows(rows))
