"""Write the multi-path blocks of a model spec as PyTorch source (residuals, parallel branches,
concats, attention), and dispatch every block to its writer."""

from __future__ import annotations

from .layers import (
    ACTIVATIONS,
    Writer,
    batch_norm,
    conv_layer,
    emit_act,
    emit_bn,
    emit_conv,
    emit_linear,
    emit_noop,
    emit_pool,
    emit_scale,
    pool_layer,
    scale,
)
from .spec import Block, Shape, centred_padding, output_shape


def emit(w: Writer, name: str, block: Block, shape: Shape) -> Shape:
    """Write `block` (its layers named after `name`) and return the shape after it."""
    EMITTERS[block.kind](w, name, block, shape)
    return output_shape(block, shape)


def emit_residual(w: Writer, name: str, block: Block, shape: Shape) -> None:
    """x + body(x); bodies hold no residuals, so one `skip` name suffices."""
    w.line("skip = x")
    for i, inner in enumerate(block.body):
        shape = emit(w, f"{name}_{i}", inner, shape)
    w.line("x = skip + x")


def centred(branch: dict) -> dict:
    """A branch conv's hyper-parameters with the padding that keeps every branch aligned."""
    dilation = branch.get("dil", 1)
    return {**branch, "pad": tuple(centred_padding(k, dilation) for k in branch["k"])}


def emit_branches(w: Writer, name: str, block: Block, shape: Shape) -> None:
    """RepVGG / ACNet / MobileOne / UniRepLKNet style: branches on one input, summed."""
    out, stride, dims = block["out"], block["stride"], shape.dims
    for j, branch in enumerate(block["items"]):
        branch_name, var = f"{name}_{j}", f"y{j}"
        kind = branch["kind"]
        if kind == "conv":
            params = centred({**branch, "stride": stride, "groups": block["groups"]})
            layer = w.layer(branch_name, conv_layer(dims, shape.channels, out, params))
            w.line(f"{var} = {layer}(x)")
        elif kind == "pool":
            layer = w.layer(branch_name, pool_layer("AvgPool", shape, stride))
            w.line(f"{var} = {layer}(x)")
        else:  # identity, or batch norm only (its norm follows)
            w.line(f"{var} = x")
        branch_shape = Shape("spatial", out, shape.sizes)
        if branch.get("bn"):
            batch_norm(w, f"{branch_name}_bn", branch_shape, *branch["bn"], var)
        if branch.get("scale"):
            variant = "branch" if branch["scale"] == "scalar" else "layer"
            scale(w, branch_name, variant, branch_shape, var)
    w.line("x = " + " + ".join(f"y{j}" for j in range(len(block["items"]))))
    if block["act"]:
        w.line("x = " + ACTIVATIONS[block["act"]].format("x"))


def emit_concat(w: Writer, name: str, block: Block, shape: Shape) -> None:
    """Parts concatenated along channels: each reads all of x ("parallel") or its own channel
    slice ("split", InceptionNeXt), through a conv or as is."""
    parts, dims = block["parts"], shape.dims
    if block["variant"] == "split":
        names = ", ".join(f"y{j}" for j in range(len(parts)))
        w.line(f"{names}, = x.split({[part['out'] for part in parts]!r}, dim=1)")
    for j, part in enumerate(parts):
        source = f"y{j}" if block["variant"] == "split" else "x"
        if part["kind"] == "identity":
            w.line(f"y{j} = {source}")
            continue
        cin = part["out"] if block["variant"] == "split" else shape.channels
        params = centred({**part, "stride": block["stride"]})
        layer = w.layer(f"{name}_{j}", conv_layer(dims, cin, part["out"], params))
        w.line(f"y{j} = {layer}({source})")
    w.line(f"x = torch.cat([{', '.join(f'y{j}' for j in range(len(parts)))}], dim=1)")


def emit_attention(w: Writer, name: str, block: Block, shape: Shape) -> None:
    """Multi-head attention over tokens: SDPA, softmax(q k^T * s) v written out, or softmax-free
    (phi(q) phi(k)^T [* s]) v with an optional normalizer, in the quadratic order."""
    if shape.mode == "spatial":
        w.line("x = x.flatten(2).transpose(1, 2)")
    features, heads = shape.channels, block["heads"]
    head = features // heads
    bias = block["bias"]
    if block["qkv"] == "fused":
        qkv = w.layer(f"{name}_qkv", f"nn.Linear({features}, {3 * features}, bias={bias})")
        w.line(f"q, k, v = {qkv}(x).unflatten(-1, (3, {heads}, {head})).permute(2, 0, 3, 1, 4)")
    else:
        for part in "qkv":
            layer = w.layer(f"{name}_{part}", f"nn.Linear({features}, {features}, bias={bias})")
            w.line(f"{part} = {layer}(x).unflatten(-1, ({heads}, {head})).transpose(1, 2)")
    variant = block["variant"]
    if variant == "sdpa":
        w.line("x = F.scaled_dot_product_attention(q, k, v)")
    elif variant == "manual":
        w.line(f"x = torch.softmax(q @ k.transpose(-2, -1) * {head**-0.5!r}, dim=-1) @ v")
    else:
        phi = "F.relu({})" if block["phi"] == "relu" else "(F.elu({}) + 1)"
        w.line(f"q, k = {phi.format('q')}, {phi.format('k')}")
        length = output_shape(block, shape).sizes[0]
        scaled = f" * {1 / (length * head)!r}" if block["scaled"] else ""
        if block["normalize"]:
            w.line(f"s = q @ k.transpose(-2, -1){scaled}")
            w.line("x = (s @ v) / (s.sum(-1, keepdim=True) + 1e-6)")
        else:
            w.line(f"x = (q @ k.transpose(-2, -1){scaled}) @ v")
    w.line("x = x.transpose(1, 2).flatten(2)")
    if block["proj"]:
        proj = w.layer(f"{name}_proj", f"nn.Linear({features}, {features}, bias={bias})")
        w.line(f"x = {proj}(x)")


EMITTERS = {
    "conv": emit_conv,
    "linear": emit_linear,
    "bn": emit_bn,
    "act": emit_act,
    "scale": emit_scale,
    "noop": emit_noop,
    "pool": emit_pool,
    "residual": emit_residual,
    "branches": emit_branches,
    "concat": emit_concat,
    "attention": emit_attention,
    "linear_attention": emit_attention,
}
