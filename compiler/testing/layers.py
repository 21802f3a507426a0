"""Write the single-path blocks of a model spec as PyTorch source: layer definitions for
`__init__` and statements for `forward`, which always reads and rebinds `x`.

Parameters are named by role, and `init_weights` in the generated script draws them by that
name: `*_gamma` and `*_scale` stay positive and away from 1, `*_shift` and biases are small.
"""

from __future__ import annotations

import math

from .spec import Block, Shape, linear_input, output_shape

ACTIVATIONS = {
    "relu": "F.relu({})",
    "gelu": "F.gelu({})",
    "silu": "F.silu({})",
    "sigmoid": "torch.sigmoid({})",
    "tanh": "torch.tanh({})",
    "hardswish": "F.hardswish({})",
    "leaky_relu": "F.leaky_relu({}, 0.1)",
    "elu": "F.elu({})",
    "relu6": "F.relu6({})",
}
NOOPS = {
    "clone": "x = x.clone()",
    "contiguous": "x = x.contiguous()",
    "reshape": "x = x.reshape(x.shape)",
    "transpose": "x = x.transpose(1, -1).transpose(1, -1)",
    "mul_one": "x = x * 1",
    "add_zero": "x = x + 0",
}


class Writer:
    """Collects the `__init__` and `forward` lines of the generated module."""

    def __init__(self) -> None:
        self.init: list[str] = []
        self.forward: list[str] = []

    def layer(self, name: str, expr: str) -> str:
        self.init.append(f"self.{name} = {expr}")
        return f"self.{name}"

    def param(self, name: str, shape: tuple[int, ...]) -> str:
        return self.layer(name, f"nn.Parameter(torch.empty({shape!r}))")

    def line(self, code: str) -> None:
        self.forward.append(code)


def channel_shape(shape: Shape, channels: int) -> tuple[int, ...]:
    """A per-channel parameter's shape, broadcasting over everything but channels."""
    return (channels, *(1,) * shape.dims) if shape.mode == "spatial" else (channels,)


def batch_norm(w: Writer, name: str, shape: Shape, eps: float, affine: bool, var: str = "x"):
    """`var = bn(var)` over channels (over features for tokens and flat inputs)."""
    dims = max(shape.dims, 1)
    norm = w.layer(name, f"nn.BatchNorm{dims}d({shape.channels}, eps={eps}, affine={affine})")
    if shape.mode == "tokens":  # SLAB: normalize the features of every token
        w.line(f"{var} = {norm}({var}.transpose(1, 2)).transpose(1, 2)")
    else:
        w.line(f"{var} = {norm}({var})")


def scale(w: Writer, name: str, variant: str, shape: Shape, var: str = "x") -> None:
    """Layer scale and its relatives: x * gamma, x * a + b, x * scalar, x / a."""
    channels = channel_shape(shape, shape.channels)
    if variant == "layer":
        w.line(f"{var} = {var} * {w.param(f'{name}_gamma', channels)}")
    elif variant == "affine":
        a, b = w.param(f"{name}_scale", channels), w.param(f"{name}_shift", channels)
        w.line(f"{var} = {var} * {a} + {b}")
    elif variant == "scalar":
        w.line(f"{var} = {var} * 0.75")
    elif variant == "branch":
        w.line(f"{var} = {var} * {w.param(f'{name}_scale', ())}")
    else:
        w.line(f"{var} = {var} / {w.param(f'{name}_scale', channels)}")


def post_ops(w: Writer, name: str, block: Block, shape: Shape) -> None:
    """The optional norm, activation and scale after a conv or linear."""
    if block["bn"]:
        batch_norm(w, f"{name}_bn", shape, *block["bn"])
    if block["act"]:
        w.line("x = " + ACTIVATIONS[block["act"]].format("x"))
    if block["scale"]:
        scale(w, name, block["scale"], shape)


def computed_weight(w: Writer, name: str, variant: str, weight_shape: tuple[int, ...]) -> str:
    """A weight computed from parameters at run time (fold_constants folds it)."""
    weight = f"self.{name}.weight"
    if variant == "masked":
        count, shape = math.prod(weight_shape), tuple(weight_shape)
        mask = f"(torch.arange({count}) % 3 != 0).float().reshape({shape!r})"
        w.init.append(f'self.register_buffer("{name}_mask", {mask})')
        return f"{weight} * self.{name}_mask"
    if variant == "reparam":  # weight normalization: g * v / |v|
        rows = (weight_shape[0], *(1,) * (len(weight_shape) - 1))
        g = w.param(f"{name}_norm_scale", rows)
        return f"{g} * {weight} / {weight}.flatten(1).norm(dim=1).reshape({rows!r})"
    return f"{weight}.flip(-1)"


def conv_layer(dims: int, cin: int, cout: int, b: dict, transposed: bool = False) -> str:
    """`nn.Conv*d` / `nn.ConvTranspose*d` with `b`'s hyper-parameters."""
    k, stride, pad, dil = tuple(b["k"]), b.get("stride", 1), tuple(b["pad"]), b.get("dil", 1)
    groups, bias = b.get("groups", 1), b.get("bias", True)
    if transposed:
        return (
            f"nn.ConvTranspose{dims}d({cin}, {cout}, {k!r}, stride={stride}, padding={pad!r}, "
            f"output_padding={b['out_pad']}, groups={groups}, bias={bias}, dilation={dil})"
        )
    return (
        f"nn.Conv{dims}d({cin}, {cout}, {k!r}, stride={stride}, padding={pad!r}, "
        f"dilation={dil}, groups={groups}, bias={bias})"
    )


def emit_conv(w: Writer, name: str, block: Block, shape: Shape) -> None:
    transposed = block["variant"] == "transposed"
    if block["pre_bn"]:
        batch_norm(w, f"{name}_pre", shape, *block["pre_bn"])
    dims, cin, cout, groups = shape.dims, shape.channels, block["out"], block["groups"]
    conv = w.layer(name, conv_layer(dims, cin, cout, block.params, transposed))
    if not block["weight_fn"]:
        w.line(f"x = {conv}(x)")
    else:
        rows, cols = (cin, cout // groups) if transposed else (cout, cin // groups)
        weight = computed_weight(w, name, block["weight_fn"], (rows, cols, *block["k"]))
        pad, dil, stride = tuple(block["pad"]), block["dil"], block["stride"]
        if transposed:
            args = f"{stride}, {pad!r}, {block['out_pad']}, {groups}, {dil}"
            w.line(f"x = F.conv_transpose{dims}d(x, {weight}, {conv}.bias, {args})")
        else:
            args = f"{stride}, {pad!r}, {dil}, {groups}"
            w.line(f"x = F.conv{dims}d(x, {weight}, {conv}.bias, {args})")
    post_ops(w, name, block, output_shape(block, shape))


def emit_linear(w: Writer, name: str, block: Block, shape: Shape) -> None:
    if shape.mode == "spatial":  # to tokens, or average over space
        axes = tuple(range(2, 2 + shape.dims))
        tokens = block["to"] == "tokens"
        w.line("x = x.flatten(2).transpose(1, 2)" if tokens else f"x = x.mean({axes!r})")
    shape = linear_input(block, shape)
    if block["pre_bn"]:
        batch_norm(w, f"{name}_pre", shape, *block["pre_bn"])
    linear = w.layer(name, f"nn.Linear({shape.channels}, {block['out']}, bias={block['bias']})")
    if block["weight_fn"]:
        weight = computed_weight(w, name, block["weight_fn"], (block["out"], shape.channels))
        w.line(f"x = F.linear(x, {weight}, {linear}.bias)")
    else:
        w.line(f"x = {linear}(x)")
    post_ops(w, name, block, Shape(shape.mode, block["out"], shape.sizes))


def emit_bn(w: Writer, name: str, block: Block, shape: Shape) -> None:
    batch_norm(w, name, shape, block["eps"], block["affine"])


def emit_act(w: Writer, name: str, block: Block, shape: Shape) -> None:
    w.line("x = " + ACTIVATIONS[block["act"]].format("x"))


def emit_scale(w: Writer, name: str, block: Block, shape: Shape) -> None:
    scale(w, name, block["variant"], shape)


def emit_noop(w: Writer, name: str, block: Block, shape: Shape) -> None:
    """Ops that return their input: eval dropout, copies, same-shape views, x * 1."""
    variant = block["variant"]
    if variant == "dropout":
        w.line(f"x = {w.layer(name, 'nn.Dropout(0.25)')}(x)")
    elif variant == "flatten":
        w.line(f"x = x.flatten(1).unflatten(1, {shape.per_example!r})")
    else:
        w.line(NOOPS[variant])


def emit_pool(w: Writer, name: str, block: Block, shape: Shape) -> None:
    kind = "AvgPool" if block["variant"] == "avg" else "MaxPool"
    w.line(f"x = {w.layer(name, pool_layer(kind, shape, block['stride']))}(x)")


def pool_layer(kind: str, shape: Shape, stride: int) -> str:
    """A 3-wide pool keeping the size (at stride 1); 1-wide along axes shorter than 3, which
    avg_pool3d rejects even when padded."""
    kernel = tuple(3 if size >= 3 else 1 for size in shape.sizes)
    padding = tuple(k // 2 for k in kernel)
    return f"nn.{kind}{shape.dims}d({kernel!r}, {stride}, {padding!r})"
