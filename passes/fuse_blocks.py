"""fuse_blocks: dw conv -> 1x1 conv (and pw -> dw -> pw [+ x])  =>  one fused-block op.

- A depthwise k x k conv (+ bias, + activation) whose only user is a 1x1 conv (+ activation)
  becomes one `fxopt::dw_pw_block` (MobileNetV1; an inverted residual without expansion).
- A 1x1 expand conv (+ act) -> depthwise conv (+ act) -> 1x1 project conv (+ act), plus the
  block input when the project feeds `x + out`, becomes one `fxopt::pw_dw_pw_block`
  (MobileNetV2 inverted residual), when its per-tile working set fits on chip; otherwise its
  dw -> pw tail becomes a `dw_pw_block`.
The TVM backend lowers each op to one kernel (`fxopt.codegen.block_converters`): a spatial tile of
the dw output for all channels stays on chip and the 1x1 conv reads it there, which neither TVM's
FuseOps nor torch.compile does for two convolutions. Eager runs the same ATen calls, so run this
pass only for backend="tvm". ConvNeXt's block is not fused: after export it is dw 7x7 -> permute ->
layer_norm -> linear -> gelu -> linear -> mul -> permute -> add, so the dw conv's user is a
permute and the MLP is a pair of channels-last linears, not 1x1 convs (a tile holds all channels
of its pixels, so a dw -> LayerNorm -> MLP kernel is possible; it is not written yet).
Exact: yes; the fused op's eager form makes the unfused graph's ATen calls in the same order (bit
for bit), and its TVM kernel computes the same sums per output (dw and pw are not reassociated).
Declines when: the dw output (or its activation) has another user; a weight or bias is not a
constant, is shared, or is not fp32 (the kernels are fp32); the dw conv has a channel multiplier
or stride above 2, or the 1x1 conv is grouped, strided or padded; the input is not a batched
NCHW tensor; a value is written in place; the padding is a string; or the working set of the
smallest tile (`fxopt.ir.block_ops.TILES`) exceeds `fxopt.ir.block_ops.ON_CHIP_BYTES` (48 KiB:
CUDA's static shared memory per thread block; 3072 channels for a 2x2 dw tile, fewer with an
expand halo).
Cost rule: none. dw -> pw does the same FLOPs and never writes the intermediate to memory;
pw -> dw -> pw recomputes the expand conv on each tile's halo. Measured on CPU (llvm, one
thread, against the same convs as separate TVM functions): dw -> pw 1.9-3.8x faster,
inverted residuals 1.1-3.3x (the smallest gain at 384 hidden channels on 14x14).
Reference: "On the Efficiency of Convolutional Neural Networks" (ConvFirst block fusion);
MobileNetV1 (Howard et al. 2017), MobileNetV2 (Sandler et al. 2018).
"""

from __future__ import annotations

import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from fxopt.ir.block_ops import DW_PW_BLOCK, PW_DW_PW_BLOCK, tile_for
from fxopt.ir.graph import arg, call, constant, is_op, mutated_nodes, only_user, owns_weights, val
from fxopt.ir.ops import Conv, conv
from fxopt.rules.registry import register_pass
from fxopt.rules.rewrite import Match, PassResult, Rule, decline, rewrite

aten = torch.ops.aten


def activation(node: fx.Node) -> str | None:
    """The `fxopt.ir.block_ops.ACTIVATIONS` name of an activation node, or None."""
    if is_op(node, aten.relu6) or is_op(node, aten.hardtanh) and tuple(node.args[1:3]) == (0, 6):
        return "relu6"
    if is_op(node, aten.gelu):
        return "gelu_tanh" if arg(node, 1, "approximate", "none") == "tanh" else "gelu"
    for op, name in ((aten.relu, "relu"), (aten.silu, "silu"), (aten.hardswish, "hardswish")):
        if is_op(node, op) and len(node.args) == 1 and not node.kwargs:
            return name
    return None


def kernel_of(c: Conv) -> tuple[int, ...]:
    return tuple(val(c.weight).shape[2:])


def is_pw(node: fx.Node) -> bool:
    return is_op(node, aten.conv2d) and kernel_of(conv(node)) == (1, 1)


def is_dw(node: fx.Node) -> bool:
    """A 2-D conv with one input channel per group (depthwise, any channel multiplier)."""
    if not is_op(node, aten.conv2d) or len(kernel_of(conv(node))) != 2:
        return False
    c, x = conv(node), val(node.args[0])
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        return False
    return val(c.weight).shape[1] == 1 and c.groups == x.shape[1]


def stage(node: fx.Node, accept) -> list[fx.Node] | None:
    """[conv] or [conv, act]: `node` is an activation of an `accept`-ed conv, or that conv."""
    if activation(node) and accept(node.args[0]):
        return [node.args[0], node]
    return [node] if accept(node) else None


def tail_has_act(nodes: list[fx.Node]) -> bool:
    """The last conv of `nodes` has a single user that is an activation (the block ends there)."""
    user = only_user(nodes[-1])
    return user is not None and activation(user) is not None


def dw_pw_nodes(node: fx.Node) -> list[fx.Node] | None:
    """[dw, (act), pw, (act)] ending at `node`."""
    pw = stage(node, is_pw)
    if pw is None or tail_has_act(pw):
        return None
    dw = stage(pw[0].args[0], is_dw)
    return None if dw is None else dw + pw


def inverted_chain(node: fx.Node) -> list[fx.Node] | None:
    """[expand, (act), dw, (act), project, (act)] ending at `node`."""
    found = dw_pw_nodes(node)
    expand = stage(found[0].args[0], is_pw) if found else None
    return None if expand is None or tail_has_act(expand) else expand + found


def residual_chain(node: fx.Node) -> list[fx.Node] | None:
    """The chain of `x + out` (either order), where `out` ends an inverted residual on x."""
    if not is_op(node, aten.add) or len(node.args) != 2 or node.kwargs:
        return None
    a, b = node.args
    for x, out in ((a, b), (b, a)):
        found = inverted_chain(out) if isinstance(out, fx.Node) else None
        if found and found[0].args[0] is x and same_shape(x, out, node):
            return found
    return None


def same_shape(*nodes: fx.Node) -> bool:
    """The values have one shape (an add of them does not broadcast)."""
    values = [val(n) for n in nodes]
    if not all(isinstance(v, torch.Tensor) for v in values):
        return False
    first = values[0].shape
    return all(len(v.shape) == len(first) for v in values) and all(
        statically_known_true(a == b) for v in values for a, b in zip(v.shape, first, strict=True)
    )


def inverted_nodes(node: fx.Node) -> list[fx.Node] | None:
    """[expand, (act), dw, (act), project, (act), (add)] ending at `node`."""
    chain = residual_chain(node)
    if chain is not None:
        return [*chain, node]
    user = only_user(node)
    if user is not None and residual_chain(user) is not None:
        return None  # the block ends at the add
    return inverted_chain(node)


def convs(nodes: list[fx.Node]) -> list[Conv]:
    return [conv(n) for n in nodes if is_op(n, aten.conv2d)]


def can_fuse(match: Match) -> bool:
    """The shared preconditions of both rules."""
    gm, nodes = match.gm, match.nodes
    if any(len(n.users) != 1 for n in nodes[:-1]):
        return decline("an intermediate value of the block has another user")
    if set(nodes) & mutated_nodes(gm):
        return decline("a value of the block is written in place")
    x = val(convs(nodes)[0].node.args[0])
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.dtype != torch.float32:
        return decline("the block input is not a batched fp32 NCHW tensor")
    for c in convs(nodes):
        if not owns_weights(gm, c.weight, c.bias) or constant(gm, c.weight).dtype != x.dtype:
            return decline(f"{c.node.name}: weight or bias is not an fp32 constant of its own")
        if isinstance(c.padding, str):
            return decline(f"{c.node.name}: padding={c.padding!r} is not supported")
        if is_pw(c.node) and (c.groups != 1 or c.stride != (1, 1) or c.padding != (0, 0)):
            return decline(f"{c.node.name}: the 1x1 conv is grouped, strided or padded")
    dw = convs(nodes)[-2]  # the convs are [expand,] dw, pw
    if val(dw.weight).shape[0] != dw.groups:
        return decline(f"{dw.node.name}: depthwise conv with a channel multiplier")
    if max(dw.stride) > 2:
        return decline(f"{dw.node.name}: the fused kernels support dw stride 1 and 2")
    expand = is_op(match.root, aten.add) or len(convs(nodes)) == 3
    if tile_for(dw.groups, kernel_of(dw), dw.stride, dw.dilation, expand) is None:
        return decline(f"{dw.node.name}: the working set of a tile exceeds the on-chip budget")
    return True


def can_fuse_dw_pw(match: Match) -> bool:
    root = match.root
    for end in (root, only_user(root)):
        candidate = inverted_nodes(end) if end is not None else None
        if candidate and can_fuse(Match(match.gm, tuple(candidate))):
            return decline("part of an inverted residual block that pw-dw-pw fuses")
    return can_fuse(match)


def act_after(nodes: list[fx.Node], c: Conv) -> str:
    """The activation applied to conv `c`'s output within the block, or "none"."""
    index = nodes.index(c.node) + 1
    return (activation(nodes[index]) if index < len(nodes) else None) or "none"


def fuse(match: Match) -> fx.Node:
    nodes = list(match.nodes)
    cs = convs(nodes)
    dw = cs[-2]
    geometry = (list(dw.stride), list(dw.padding), list(dw.dilation))
    acts = [act_after(nodes, c) for c in cs]
    x = cs[0].node.args[0]
    weights = [w for c in cs for w in (c.weight, c.bias)]
    if len(cs) == 2:
        return call(match.gm, DW_PW_BLOCK, (x, *weights, *geometry, *acts))
    residual = is_op(match.root, aten.add)
    return call(match.gm, PW_DW_PW_BLOCK, (x, *weights, *geometry, *acts, residual))


RULES = [
    # pw -> dw -> pw (+ x)  =>  pw_dw_pw_block  (activations after each conv ride along)
    Rule("pw-dw-pw", pattern=inverted_nodes, check=can_fuse, build=fuse),
    # dw -> pw  =>  dw_pw_block
    Rule("dw-pw", pattern=dw_pw_nodes, check=can_fuse_dw_pw, build=fuse),
]


@register_pass("fuse_blocks", exact=True)
def fuse_blocks(gm: fx.GraphModule) -> PassResult:
    return rewrite(gm, RULES)
