"""Random weights and norm statistics that make folding passes do real work.

A freshly built model has batch norms at the identity (mean 0, var 1, weight 1, bias 0) and
layer-scale gammas near 0, so a pass that folds them wrongly would still pass its tests. These
draws move every such value away from its default while keeping activations at unit scale.

Running statistics drawn without looking at data drift away from what each norm actually sees:
channels die or saturate behind ReLUs, the output stops depending on the input, and residual
streams behind eval-mode norms grow geometrically. Given sample inputs, the statistics are drawn
around the mean and variance each norm really receives instead, as a trained model's would be.
"""

from __future__ import annotations

import math

import torch
from torch import nn

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_TRANSPOSES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
# Parameter names that scale a signal; they are drawn around 1 rather than around 0.
_SCALE_NAMES = ("weight", "gamma", "scale")
_MIN_VAR = 1e-2


def randomize_(
    model: nn.Module,
    generator: torch.Generator,
    inputs: tuple[torch.Tensor, ...] | None = None,
) -> nn.Module:
    """Redraw every parameter and batch-norm running statistic of `model` in place.

    Weights are normal with variance 1/fan_in, biases small normals, norm and layer-scale weights
    uniform in [0.5, 1.5]. Without `inputs`, running means are N(0, 0.5^2) and running variances
    U(0.5, 2). With `inputs`, each norm's running mean is the mean of what it receives plus
    N(0, 0.5^2) standard deviations, and its running variance the received variance times
    U(0.5, 2): the same draws in the units of the actual signal.

    Parameters
    ----------
    model
        The model to randomize.
    generator
        Source of randomness; the result is a function of its state (and of `inputs`) alone.
    inputs
        Sample inputs, as ``model(*inputs)``, to draw the running statistics around. One
        eval-mode forward pass runs; the modules' train/eval flags are restored afterwards.

    Returns
    -------
    nn.Module
        `model`, for chaining.
    """
    with torch.no_grad():
        for module in model.modules():
            for name, param in module.named_parameters(recurse=False):
                param.copy_(_draw(module, name, param.shape, generator))
        norms = [
            m for m in model.modules() if isinstance(m, _BATCH_NORMS) and m.track_running_stats
        ]
        if inputs is None:
            for norm in norms:
                _set_running_stats(norm, torch.zeros(()), torch.ones(()), generator)
        else:
            _draw_running_stats_from_data(model, norms, inputs, generator)
    return model


def _draw(module: nn.Module, name: str, shape: torch.Size, generator: torch.Generator):
    fan_in = _fan_in(module)
    if fan_in is not None and name == "weight":
        # Unit gain keeps the output variance near the input variance in front of a norm or a
        # symmetric activation; ReLU layers lose half, which the biases and norms make up.
        return _normal(shape, 1.0 / math.sqrt(fan_in), generator)
    if name.split("_")[-1] in _SCALE_NAMES and len(shape) <= 1:
        return _uniform(shape, 0.5, 1.5, generator)
    if fan_in is not None:
        return _normal(shape, 0.1, generator)
    # Norm and attention biases, positional embeddings, tokens.
    return _normal(shape, 0.2, generator)


def _set_running_stats(
    norm: nn.Module, mean: torch.Tensor, var: torch.Tensor, generator: torch.Generator
) -> None:
    shape = norm.running_mean.shape
    norm.running_mean.copy_(mean + var.sqrt() * _normal(shape, 0.5, generator))
    norm.running_var.copy_(var * _uniform(shape, 0.5, 2.0, generator))


def _draw_running_stats_from_data(
    model: nn.Module,
    norms: list[nn.Module],
    inputs: tuple[torch.Tensor, ...],
    generator: torch.Generator,
) -> None:
    # A pre-hook sets each norm's statistics just before it runs, in eval mode, so every norm
    # sees the signal as its already-randomized predecessors shape it at inference.
    done: set[nn.Module] = set()

    def set_from_input(norm: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        if norm in done:  # a norm called twice keeps the statistics of its first call
            return
        done.add(norm)
        x = args[0]
        dims = [0, *range(2, x.dim())]
        # The floor keeps a constant channel from being amplified without bound.
        var = x.var(dims, unbiased=False).clamp_min(_MIN_VAR)
        _set_running_stats(norm, x.mean(dims), var, generator)

    modes = {module: module.training for module in model.modules()}
    handles = [norm.register_forward_pre_hook(set_from_input) for norm in norms]
    try:
        model.eval()
        model(*inputs)
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training
    # Norms the forward pass never reached still must not sit at the identity.
    for norm in norms:
        if norm not in done:
            _set_running_stats(norm, torch.zeros(()), torch.ones(()), generator)


def _fan_in(module: nn.Module) -> int | None:
    if isinstance(module, nn.Linear):
        return module.in_features
    if isinstance(module, _CONVS):
        return module.in_channels // module.groups * math.prod(module.kernel_size)
    if isinstance(module, _CONV_TRANSPOSES):
        # Each output position sees only about kernel/stride taps of each input channel.
        taps = math.prod(module.kernel_size) / math.prod(module.stride)
        return max(1, round(module.in_channels // module.groups * taps))
    return None


def _normal(shape: torch.Size, std: float, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=generator) * std


def _uniform(shape: torch.Size, low: float, high: float, generator: torch.Generator):
    return low + (high - low) * torch.rand(shape, generator=generator)
