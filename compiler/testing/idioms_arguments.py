"""The idioms of `fxopt.testing.fuzz` that read the call's arguments or branch on values:
attention with an optional mask (or a causal buffer), masked_fill, an int scale and a bool
flag, and control flow on a tensor's value. See `fxopt.testing.idioms` for the conventions."""

from __future__ import annotations

from .idioms import Context, State, point_layer
from .layers import Writer

FILLS = {"-inf": 'float("-inf")', "min": "torch.finfo(s.dtype).min", "-1e9": "-1e9"}


def emit_attention(w: Writer, ctx: Context, name: str, p: dict, s: State) -> State:
    """x + proj(attention(x)): SDPA or softmax(q k^T * s [masked]) v, with the mask from the
    `mask` argument (skipped when it is None) or a causal buffer."""
    c, heads, tokens = s.channels, p["heads"], ctx.height * ctx.width
    head = c // heads
    if p["fused"]:
        qkv = w.layer(f"{name}_qkv", f"nn.Linear({c}, {3 * c})")
        w.line(f"q, k, v = {qkv}(x).reshape(B, -1, 3, {heads}, {head}).permute(2, 0, 3, 1, 4)")
    else:
        for part in "qkv":
            layer = w.layer(f"{name}_{part}", f"nn.Linear({c}, {c})")
            w.line(f"{part} = {layer}(x).view(B, -1, {heads}, {head}).transpose(1, 2)")
    source = p["mask"]
    if source == "causal":
        causal = f"torch.tril(torch.ones({tokens}, {tokens}, dtype=torch.bool))"
        w.init.append(f'self.register_buffer("{name}_causal", {causal}, persistent=False)')
        ctx.idioms |= {"buffer read", "masks"}
    elif source == "arg":
        ctx.arguments.add("mask")
        ctx.idioms.add("masks")
    if p["sdpa"]:
        w.line("attn_mask = None")
        if source == "causal":
            w.line(f"attn_mask = self.{name}_causal")
        elif source == "arg":
            w.line("if mask is not None:\n    attn_mask = mask[:, None, None, :]")
        w.line("x_attn = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)")
    else:
        w.line(f"s = (q @ k.transpose(-2, -1)) * {head**-0.5!r}")
        fill = FILLS[p["fill"]]
        if source == "causal":
            w.line(f"s = s.masked_fill(~self.{name}_causal, {fill})")
        elif source == "arg" and ctx.mask == "bool":
            w.line(f"if mask is not None:\n    s = s.masked_fill(~mask[:, None, None, :], {fill})")
        elif source == "arg":
            w.line("if mask is not None:\n    s = s + mask[:, None, None, :]")
        w.line("x_attn = s.softmax(dim=-1) @ v")
    proj = w.layer(f"{name}_proj", f"nn.Linear({c}, {c})")
    w.line(f"x = x + {proj}(x_attn.transpose(1, 2).reshape(B, -1, {c}))")
    ctx.idioms.add("attention")
    return s


def emit_masked_fill(w: Writer, ctx: Context, name: str, p: dict, s: State) -> State:
    """Zero the masked positions, when a mask is given."""
    shape = f"B, 1, {ctx.height}, {ctx.width}" if s.mode == "spatial" else "B, -1, 1"
    keep = "mask" if ctx.mask == "bool" else "(mask == 0)"
    if p["fill"]:
        w.line(f"if mask is not None:\n    x = x.masked_fill(~{keep}.view({shape}), 0.0)")
    else:
        w.line(f"if mask is not None:\n    x = x * {keep}.view({shape}).to(x.dtype)")
    ctx.arguments.add("mask")
    ctx.idioms.add("masks")
    return s


def emit_scalar(w: Writer, ctx: Context, name: str, p: dict, s: State) -> State:
    """An int scale and a bool flag from the call's arguments."""
    if p["scale"]:
        w.line("x = x * scale")
        ctx.arguments.add("scale")
    if p["flag"]:
        w.line("if flag:\n    x = F.gelu(x)")
        ctx.arguments.add("flag")
    ctx.idioms.add("non-tensor argument")
    return s


def emit_data_branch(w: Writer, ctx: Context, name: str, p: dict, s: State) -> State:
    """Control flow on a tensor's value (`if mask.any():`): torch.export cannot capture it, so
    optimize takes its Dynamo fallback."""
    layer = point_layer(w, name, s, s.channels)
    w.line(f"if x.mean() > {p['threshold']!r}:\n    x = {layer}(x)\nelse:\n    x = x * 0.5")
    ctx.idioms.add("data-dependent branch")
    return s


EMITTERS = {
    "attention": emit_attention,
    "masked_fill": emit_masked_fill,
    "scalar": emit_scalar,
    "data_branch": emit_data_branch,
}
