"""fold_conv_bn: conv -> batch_norm  =>  conv with the norm folded into weight and bias; also
cat(conv, ..., conv) -> batch_norm  =>  cat(conv', ..., conv') (each conv takes its channels).

Exact: yes; eval-mode batch norm is a per-channel affine map, `y = x * s + t` with
s = gamma / sqrt(var + eps) and t = beta - mean * s, and a conv's output channels scale with
its filter rows (conv1d/2d/3d and conv_transpose1d/2d/3d, any groups, stride, dilation, padding).
Declines when: the norm uses batch statistics (training mode or no running statistics), the conv
input is unbatched, the conv output has another user, the conv's weight or bias is not a constant
or is shared with another op (torch.fx's own fuser corrupts that case, pytorch issue 104593), or
the channel counts differ; a cat joins along another axis than the channels, or one of its
convs (or the cat) has another user.
Reference: Ioffe & Szegedy 2015.
"""

import torch
from torch import fx

from fxopt.analysis.affine import affine_bias, bn_scale_shift, scale_output_channels
from fxopt.ir.graph import add_constant, arg, call, constant, is_op, owns_weights, val
from fxopt.ir.ops import ANY_CONV, BATCH_NORM, batch_norm, conv, replaced_args
from fxopt.rules.registry import register_pass
from fxopt.rules.rewrite import Match, PassResult, Rule, decline, rewrite

aten = torch.ops.aten


BATCH_STATISTICS = (
    "the norm uses batch statistics (training mode or no running statistics) or "
    "non-constant parameters"
)


def can_fold(match: Match) -> object:
    """The norm to fold into the conv, or a `decline` saying why it cannot be."""
    gm, producer, norm = match.gm, match[0], match.root
    c, bn = conv(producer), batch_norm(gm, norm)
    if c is None:
        return decline(f"{producer.name} is not a conv call fxopt reads")
    if bn is None:
        return decline(BATCH_STATISTICS)
    if len(producer.users) != 1:
        return decline("the conv output has another user")
    if not owns_weights(gm, c.weight, c.bias):
        return decline("the conv's weight or bias is not a constant or is shared")
    out, weight = producer.meta["val"], constant(gm, c.weight)
    if out.dim() != weight.dim():  # an unbatched conv's dim 1 is space, not channels
        return decline("the conv input is unbatched")
    if bn.mean.numel() != out.shape[1]:
        return decline("the channel counts differ")
    return bn


def fold(match: Match) -> fx.Node:
    gm, producer, bn = match.gm, match[0], match.plan
    scale, shift = bn_scale_shift(bn.mean, bn.var, bn.weight, bn.bias, bn.eps)
    return folded_conv(gm, producer, scale, shift)


def folded_conv(gm: fx.GraphModule, producer: fx.Node, scale, shift) -> fx.Node:
    """A copy of the conv call `producer` with `x * scale + shift` per output channel folded
    into its weight and bias."""
    c = conv(producer)
    weight = constant(gm, c.weight)
    bias = constant(gm, c.bias) if c.bias is not None else None
    new_weight = scale_output_channels(weight, scale, c.transposed, c.groups)
    new_bias = affine_bias(bias, scale, shift, weight.dtype)
    args, kwargs = replaced_args(
        producer,
        weight=add_constant(gm, new_weight, f"{c.weight.target}_bn"),
        bias=add_constant(gm, new_bias, f"{c.weight.target}_bn_bias"),
    )
    return call(gm, producer.target, args, kwargs)


def convs_then_norm(node: fx.Node) -> list[fx.Node] | None:
    """[convs..., cat, bn]: a batch norm of the channel-wise concatenation of convs
    (MixNet's mixed kernels, Inception branches)."""
    if not is_op(node, *BATCH_NORM) or not is_op(node.args[0], aten.cat):
        return None
    joined = node.args[0]
    parts = joined.args[0]
    if not all(conv(p) is not None for p in parts) or len(set(parts)) != len(parts):
        return None
    return [*parts, joined, node]


def can_fold_cat(match: Match) -> object:
    """The norm to fold into the cat's convs, or a `decline` saying why it cannot be."""
    gm, (*parts, joined, norm) = match.gm, match.nodes
    bn, out = batch_norm(gm, norm), val(joined)
    if bn is None:
        return decline(BATCH_STATISTICS)
    if out is None or out.dim() < 2:
        return decline("the cat's value is not a batched tensor")
    if len(joined.users) != 1:
        return decline("the cat has another user")
    if arg(joined, 1, "dim", 0) % out.dim() != 1:
        return decline("the cat joins along another axis than the channels")
    for part in parts:
        c = conv(part)
        if list(part.users) != [joined]:
            return decline(f"the conv {part.name} has another user")
        if not owns_weights(gm, c.weight, c.bias):
            return decline(f"the weight or bias of {part.name} is not a constant or is shared")
        if val(part).dim() != constant(gm, c.weight).dim():  # unbatched: dim 1 is space
            return decline(f"the input of {part.name} is unbatched")
    if bn.mean.numel() != out.shape[1]:
        return decline("the channel counts differ")
    return bn


def fold_cat(match: Match) -> fx.Node:
    """Each conv takes the norm's map for its own slice of the channels."""
    gm, (*parts, joined, _), bn = match.gm, match.nodes, match.plan
    scale, shift = bn_scale_shift(bn.mean, bn.var, bn.weight, bn.bias, bn.eps)
    folded, start = [], 0
    for part in parts:
        width = val(part).shape[1]
        window = slice(start, start + width)
        with gm.graph.inserting_before(joined):
            folded.append(folded_conv(gm, part, scale[window], shift[window]))
        start += width
    return call(gm, aten.cat.default, (folded, 1))


RULES = [
    # conv -> bn  =>  conv'
    Rule("conv-bn", pattern=(ANY_CONV, BATCH_NORM), check=can_fold, build=fold),
    # cat(conv_1, ..., conv_n) -> bn  =>  cat(conv_1', ..., conv_n')
    Rule("cat-conv-bn", pattern=convs_then_norm, check=can_fold_cat, build=fold_cat),
]


@register_pass("fold_conv_bn", exact=True)
def fold_conv_bn(gm: fx.GraphModule) -> PassResult:
    return rewrite(gm, RULES)
