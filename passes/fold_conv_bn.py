"""fold_conv_bn: conv -> batch_norm  =>  conv with the norm folded into weight and bias.

Exact: yes; eval-mode batch norm is a per-channel affine map, `y = x * s + t` with
s = gamma / sqrt(var + eps) and t = beta - mean * s, and a conv's output channels scale with
its filter rows (conv1d/2d/3d and conv_transpose1d/2d/3d, any groups, stride, dilation, padding).
Declines when: the norm uses batch statistics (training mode or no running statistics), the conv
input is unbatched, the conv output has another user, the conv's weight or bias is not a constant
or is shared with another op (torch.fx's own fuser corrupts that case, pytorch issue 104593), or
the channel counts differ.
Reference: Ioffe & Szegedy 2015.
"""

from torch import fx

from fxopt.graph import add_constant, call, constant, owns_weights
from fxopt.ops import ANY_CONV, BATCH_NORM, batch_norm, conv, replaced_args
from fxopt.registry import register_pass
from fxopt.rewrite import Match, PassResult, Rule, rewrite

from .affine import affine_bias, bn_scale_shift, scale_output_channels


def can_fold(match: Match) -> bool:
    gm, producer, norm = match.gm, match[0], match.root
    c, bn = conv(producer), batch_norm(gm, norm)
    if c is None or bn is None or len(producer.users) != 1:
        return False
    if not owns_weights(gm, c.weight, c.bias):
        return False
    out, weight = producer.meta["val"], constant(gm, c.weight)
    # an unbatched conv's dim 1 is space, not channels
    return out.dim() == weight.dim() and bn.mean.numel() == out.shape[1]


def fold(match: Match) -> fx.Node:
    gm, producer = match.gm, match[0]
    c, bn = conv(producer), batch_norm(gm, match.root)
    weight = constant(gm, c.weight)
    bias = constant(gm, c.bias) if c.bias is not None else None
    scale, shift = bn_scale_shift(bn.mean, bn.var, bn.weight, bn.bias, bn.eps)
    new_weight = scale_output_channels(weight, scale, c.transposed, c.groups)
    new_bias = affine_bias(bias, scale, shift, weight.dtype)
    args, kwargs = replaced_args(
        producer,
        weight=add_constant(gm, new_weight, f"{c.weight.target}_bn"),
        bias=add_constant(gm, new_bias, f"{c.weight.target}_bn_bias"),
    )
    return call(gm, producer.target, args, kwargs)


RULES = [
    # conv -> bn  =>  conv'
    Rule("conv-bn", pattern=(ANY_CONV, BATCH_NORM), check=can_fold, build=fold),
]


@register_pass("fold_conv_bn", exact=True)
def fold_conv_bn(gm: fx.GraphModule) -> PassResult:
    return rewrite(gm, RULES)
