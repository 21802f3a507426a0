"""The idioms `fxopt.testing.fuzz` builds models from, each written as the PyTorch source real
model code uses: in-place updates of intermediates, view and reshape chains, conv / norm /
linear stacks, RepVGG-style parallel branches, shared and tied weights, and buffers the forward
reads or writes. The idioms that read the call's arguments (masks, attention, an int scale, a
flag) are in `fxopt.testing.idioms_arguments`.

Every writer appends `__init__` and `forward` lines to a `Writer`, reads and rebinds `x`, and
returns the state after it (whether `x` is an image (B, C, H, W) or tokens (B, H * W, C), and
its channel count). `H`, `W` stay fixed through a model; `B` is read from the input. The
coverage labels a writer records (`Writer.idioms`) are what a fuzzing run counts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .layers import Writer

ACTIVATIONS = {"relu": "F.relu({})", "gelu": "F.gelu({})", "silu": "F.silu({})"}
IN_PLACE = {  # op -> the statement, on the intermediate `y`
    "relu_": "y.relu_()",
    "mul_": "y.mul_(0.5)",
    "mul_gamma": "y.mul_({gamma})",  # layer scale
    "add_": "y.add_(0.25)",
    "clamp_": "y.clamp_(-1.5, 1.5)",
    "relu_inplace": "y = F.relu(y, inplace=True)",
    "iadd_branch": "y += {branch}(x)",
    "imul_scale": "y *= scale",
    "fill_slice": "y[:, 0] = 0.0",
    "slice_mul_": "y[:, :1].mul_(0.5)",  # a write through a view
    "silu_": "y.mul_(torch.sigmoid(y))",  # reads what it writes
    "tap": "{tap} = y",  # an output the later in-place ops write into too
}
VIEWS = {  # mode -> template -> statement (B, H, W, C known); each keeps the shape
    "spatial": {
        "flatten_transpose": "x = x.flatten(2).transpose(1, 2).contiguous()"
        ".view(B, {H}, {W}, {C}).permute(0, 3, 1, 2)",
        "reshape": "x = x.reshape(B, {C}, -1).reshape(B, {C}, {H}, {W})",
        "channel_shuffle": "x = x.view(B, 2, {C} // 2, {H}, {W}).transpose(1, 2)"
        ".contiguous().view(B, {C}, {H}, {W})",
        "unflatten": "x = x.flatten(1).unflatten(1, ({C}, {H}, {W}))",
        "permute": "x = x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)",
    },
    "tokens": {
        "grid": "x = x.view(B, {H}, {W}, {C}).permute(0, 3, 1, 2).flatten(2).transpose(1, 2)",
        "heads": "x = x.view(B, -1, 2, {C} // 2).transpose(1, 2).reshape(B, -1, {C})",
        "reshape": "x = x.reshape(B, -1).view(B, {T}, {C})",
        "transpose_view": "x = x.transpose(1, 2).contiguous().view(B, {C}, {H}, {W})"
        ".flatten(2).transpose(1, 2)",
    },
}


@dataclass(frozen=True)
class State:
    """What `x` is between idioms: "spatial" (B, C, H, W) or "tokens" (B, H * W, C)."""

    mode: str
    channels: int


@dataclass
class Context:
    """Per model: the image size, the mask argument's kind, and what the writers used."""

    height: int
    width: int
    mask: str | None = None  # "bool" | "additive" | None (no mask argument)
    idioms: set[str] = field(default_factory=set)
    arguments: set[str] = field(default_factory=set)  # "mask", "scale", "flag"
    taps: list[str] = field(default_factory=list)  # intermediate outputs


def act(name: str | None, value: str) -> str:
    return ACTIVATIONS[name].format(value) if name else value


def point_layer(w: Writer, name: str, state: State, out: int) -> str:
    """A channel mixer for either mode: a 1x1 conv on images, a linear on tokens."""
    if state.mode == "spatial":
        return w.layer(name, f"nn.Conv2d({state.channels}, {out}, 1)")
    return w.layer(name, f"nn.Linear({state.channels}, {out})")


def emit_conv(w: Writer, ctx: Context, name: str, p: dict, s: State) -> State:
    """[bn] -> conv -> [bn] -> [act]; depthwise when `groups` is the channel count. With
    `tap_conv`, the conv's output is an output too (a norm after it must then stay)."""
    out, k = p["out"], p["k"]
    groups = s.channels if p["depthwise"] else 1
    if p["pre_bn"]:  # a norm before a padded conv: folding it in would change the border
        w.line(f"x = {w.layer(f'{name}_pre', f'nn.BatchNorm2d({s.channels})')}(x)")
    bias = p["bias"]
    conv = f"nn.Conv2d({s.channels}, {out}, {k}, padding={k // 2}, groups={groups}, bias={bias})"
    w.line(f"x = {w.layer(name, conv)}(x)")
    if p["bn"] and p["tap_conv"]:
        w.line(f"t{len(ctx.taps)} = x")
        ctx.taps.append(f"t{len(ctx.taps)}")
        ctx.idioms.add("intermediate output")
    if p["bn"]:
        w.line(f"x = {w.layer(f'{name}_bn', f'nn.BatchNorm2d({out})')}(x)")
    if p["act"]:
        w.line(f"x = {act(p['act'], 'x')}")
    ctx.idioms.add("conv-bn-act stack")
    return State("spatial", out)


def emit_repvgg(w: Writer, ctx: Context, name: str, p: dict, s: State) -> State:
    """RepVGG: 3x3 conv-bn + 1x1 conv-bn (+ identity-bn when the width is kept), summed;
    grouped (RepVGG-A g2) or depthwise (MobileOne) with `groups`."""
    out, cin, groups = p["out"], s.channels, p["groups"]
    terms = []
    for tag, k in (("dense", 3), ("one", 1)):
        conv = f"nn.Conv2d({cin}, {out}, {k}, padding={k // 2}, groups={groups}, bias=False)"
        conv = w.layer(f"{name}_{tag}", conv)
        bn = w.layer(f"{name}_{tag}_bn", f"nn.BatchNorm2d({out})")
        terms.append(f"{bn}({conv}(x))")
    if out == cin:
        terms.append(f"{w.layer(f'{name}_id_bn', f'nn.BatchNorm2d({out})')}(x)")
    if p["inplace"]:
        w.line(f"out = {terms[0]}")
        for term in terms[1:]:
            w.line(f"out += {term}")
        w.line("x = out.relu_()")
        ctx.idioms.add("in-place")
    else:
        w.line(f"x = F.relu({' + '.join(terms)})")
    ctx.idioms.add("parallel branches")
    return State("spatial", out)


def emit_mlp(w: Writer, ctx: Context, name: str, p: dict, s: State) -> State:
    """x + fc2(act(fc1(norm(x)))): on tokens, or channels-last on images (ConvNeXt); the
    norm a layer norm or a batch norm over features (SLAB, LeViT)."""
    c = s.channels
    w.line("y = x.permute(0, 2, 3, 1)" if s.mode == "spatial" else "y = x")
    if p["norm"] == "layer":
        w.line(f"y = {w.layer(f'{name}_norm', f'nn.LayerNorm({c})')}(y)")
        ctx.idioms.add("layer norm")
    elif p["norm"] == "batch":
        norm = w.layer(f"{name}_norm", f"nn.BatchNorm1d({c})")
        if s.mode == "spatial":
            w.line(f"y = {norm}(y.flatten(0, 2)).view_as(y)")
        else:
            w.line(f"y = {norm}(y.transpose(1, 2)).transpose(1, 2)")
        ctx.idioms.add("batch norm over features")
    fc1 = w.layer(f"{name}_fc1", f"nn.Linear({c}, {p['hidden']})")
    fc2 = w.layer(f"{name}_fc2", f"nn.Linear({p['hidden']}, {c})")
    w.line(f"y = {fc2}({act(p['act'], f'{fc1}(y)')})")
    if s.mode == "spatial":
        w.line("y = y.permute(0, 3, 1, 2)")
        ctx.idioms.add("views")
    if p["inplace"]:
        w.line("y += x")
        w.line("x = y")
        ctx.idioms.add("in-place")
    else:
        w.line("x = x + y")
    ctx.idioms.add("linear stack")
    return s


def emit_inplace(w: Writer, ctx: Context, name: str, p: dict, s: State) -> State:
    """y = layer(x), then in-place ops on y (`y += branch(x)`, relu_, mul_, ...)."""
    w.line(f"y = {point_layer(w, name, s, p['out'])}(x)")
    for op in p["ops"]:
        branch = point_layer(w, f"{name}_branch", s, p["out"]) if op == "iadd_branch" else ""
        shape = (p["out"], 1, 1) if s.mode == "spatial" else (p["out"],)
        gamma = w.param(f"{name}_gamma", shape) if op == "mul_gamma" else ""
        tap = f"t{len(ctx.taps)}"
        if op == "tap":
            ctx.taps.append(tap)
            ctx.idioms.add("intermediate output")
        w.line(IN_PLACE[op].format(branch=branch, gamma=gamma, tap=tap))
        if op == "imul_scale":
            ctx.arguments.add("scale")
            ctx.idioms.add("non-tensor argument")
    w.line("x = y")
    ctx.idioms.add("in-place")
    return State(s.mode, p["out"])


def emit_views(w: Writer, ctx: Context, name: str, p: dict, s: State) -> State:
    sizes = {"H": ctx.height, "W": ctx.width, "C": s.channels, "T": ctx.height * ctx.width}
    for template in p["templates"]:
        w.line(VIEWS[s.mode][template].format(**sizes))
    ctx.idioms.add("views")
    return s


def emit_to_tokens(w: Writer, ctx: Context, name: str, p: dict, s: State) -> State:
    w.line("x = x.flatten(2).transpose(1, 2)" if p["flatten"] else "x = x.permute(0, 2, 3, 1)")
    if not p["flatten"]:
        w.line(f"x = x.reshape(B, {ctx.height * ctx.width}, {s.channels})")
    ctx.idioms.add("views")
    return State("tokens", s.channels)


def emit_to_spatial(w: Writer, ctx: Context, name: str, p: dict, s: State) -> State:
    size = f"B, {s.channels}, {ctx.height}, {ctx.width}"
    w.line(f"x = x.transpose(1, 2).{'view' if p['view'] else 'reshape'}({size})")
    ctx.idioms.add("views")
    return State("spatial", s.channels)


def emit_shared(w: Writer, ctx: Context, name: str, p: dict, s: State) -> State:
    """One module called twice."""
    c = s.channels
    if s.mode == "spatial":
        body = f"nn.Conv2d({c}, {c}, 3, padding=1), nn.BatchNorm2d({c}), nn.ReLU()"
    else:
        body = f"nn.Linear({c}, {c}), nn.GELU()"
    block = w.layer(name, f"nn.Sequential({body})")
    w.line(f"x = {block}({block}(x))" if p["nested"] else f"x = {block}(x) + {block}(x * 0.5)")
    ctx.idioms.add("shared module")
    return s


def emit_tied(w: Writer, ctx: Context, name: str, p: dict, s: State) -> State:
    """An encoder and a decoder sharing one weight: assigned, or read transposed."""
    c, hidden = s.channels, p["hidden"]
    w.line("y = x.permute(0, 2, 3, 1)" if s.mode == "spatial" else "y = x")
    enc = w.layer(f"{name}_enc", f"nn.Linear({c}, {hidden}, bias=False)")
    if p["transposed"]:
        w.line(f"y = F.linear(F.relu({enc}(y)), {enc}.weight.t())")
    else:  # square: the decoder's weight is the encoder's
        dec = w.layer(f"{name}_dec", f"nn.Linear({c}, {c})")
        w.init.append(f"{dec}.weight = {enc}.weight")
        w.line(f"y = {dec}(F.relu({enc}(y)))")
    w.line("x = y.permute(0, 3, 1, 2)" if s.mode == "spatial" else "x = y")
    ctx.idioms.add("tied weights")
    return s


def emit_normalize(w: Writer, ctx: Context, name: str, p: dict, s: State) -> State:
    """(x - mean) / std with buffers the forward reads."""
    shape = (s.channels, 1, 1) if s.mode == "spatial" else (s.channels,)
    seed = f"generator=torch.Generator().manual_seed({p['seed']})"
    persistent = "" if p["persistent"] else ", persistent=False"
    w.init.append(f'self.register_buffer("{name}_mean", torch.randn({shape}, {seed}){persistent})')
    std = f"torch.rand({shape}, {seed}) + 0.5"
    w.init.append(f'self.register_buffer("{name}_std", {std}{persistent})')
    w.line(f"x = (x - self.{name}_mean) / self.{name}_std")
    ctx.idioms.add("buffer read")
    return s


def emit_counter(w: Writer, ctx: Context, name: str, p: dict, s: State) -> State:
    """A buffer the forward writes: a call counter, or a running mean of the input."""
    w.init.append(f'self.register_buffer("{name}_state", torch.zeros(()))')
    if p["running_mean"]:
        w.line(f"self.{name}_state.mul_(0.9).add_(0.1 * x.detach().mean())")
    else:
        w.line(f"self.{name}_state += 1")
    w.line(f"x = x + 0.1 * self.{name}_state")
    ctx.idioms.add("buffer write")
    return s


EMITTERS = {
    "conv": emit_conv,
    "repvgg": emit_repvgg,
    "mlp": emit_mlp,
    "inplace": emit_inplace,
    "views": emit_views,
    "to_tokens": emit_to_tokens,
    "to_spatial": emit_to_spatial,
    "shared": emit_shared,
    "tied": emit_tied,
    "normalize": emit_normalize,
    "counter": emit_counter,
}
