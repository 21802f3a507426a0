"""fold_bn_into_next: batch_norm -> conv  =>  conv with the norm folded into its input side.

Exact: yes where it applies. Eval batch norm is `x * s + t` per channel, and a conv that reads
only real input values satisfies conv_W(x * s + t) = conv_{W * s}(x) + sum over taps of W * t,
with s and t taken per input channel (group-aware). That needs a conv without zero padding
(padding 0, "valid", or "same" with a 1-sized kernel), any kernel, stride, dilation or groups.
With zero padding the border taps read 0, where the unfolded graph reads the normalized zero t,
so a fold would change the borders; that is a known non-equivalence, kept as a negative control
in tests/passes/test_fold_bn_into_next.py.
Declines when: the conv pads with zeros (a padded 1x1 conv too), the conv is transposed, the norm
uses batch statistics (training mode or no running statistics), the norm's output has another
user, the conv's weight or bias is not a constant or is shared with another op, or the ranks or
channel counts differ. BN -> ReLU -> conv is never matched; BN -> linear is fold_linear_bn's.
Reference: Ioffe & Szegedy 2015; the affine-before-conv identity of pre-activation ResNets.
"""

import torch
from torch import fx

from fxopt.analysis.affine import bn_scale_shift, input_shift_bias, scale_input_channels
from fxopt.analysis.preconditions import can_skip_padding
from fxopt.ir.graph import add_constant, arg, call, constant, owns_weights, val
from fxopt.ir.ops import BATCH_NORM, CONVS, batch_norm, conv, replaced_args
from fxopt.rules.registry import register_pass
from fxopt.rules.rewrite import Match, PassResult, Rule, decline, rewrite

NEXT_CONVS = (*CONVS, torch.ops.aten.convolution)


def can_fold(match: Match) -> object:
    """The norm to fold into the conv after it, or a `decline` saying why it cannot be."""
    gm, norm, node = match.gm, match[0], match.root
    bn, c, x = batch_norm(gm, norm), conv(node), val(norm)
    if bn is None:
        return decline(
            "the norm uses batch statistics (training mode or no running statistics) or "
            "non-constant parameters"
        )
    if c is None or c.transposed:
        return decline("the conv is transposed or not a conv call fxopt reads")
    if len(norm.users) != 1:
        return decline("the norm's output has another user")
    if x is None:
        return decline("the norm's value is not a tensor")
    if not owns_weights(gm, c.weight, c.bias):
        return decline("the conv's weight or bias is not a constant or is shared")
    weight = constant(gm, c.weight)
    # An unbatched conv input puts the channels on dim 0, where the norm does not look.
    if x.dim() != weight.dim() or bn.mean.numel() != weight.shape[1] * c.groups:
        return decline("the ranks or channel counts differ")
    if not can_skip_padding(c, tuple(weight.shape[2:])):
        return decline("the conv pads with zeros (a padded border reads 0, not the norm's shift)")
    return bn


def fold(match: Match) -> fx.Node:
    gm, norm, node, bn, c = match.gm, match[0], match.root, match.plan, conv(match.root)
    weight = constant(gm, c.weight)
    bias = constant(gm, c.bias) if c.bias is not None else None
    scale, shift = bn_scale_shift(bn.mean, bn.var, bn.weight, bn.bias, bn.eps)
    name = c.weight.target
    args, kwargs = replaced_args(
        node,
        weight=add_constant(gm, scale_input_channels(weight, scale, c.groups), f"{name}_bn"),
        bias=add_constant(gm, input_shift_bias(weight, bias, shift, c.groups), f"{name}_bn_bias"),
    )
    return call(gm, node.target, (arg(norm, 0, "input"), *args[1:]), kwargs)


RULES = [
    # bn -> conv (no zero padding)  =>  conv' (input channels scaled, bias b + sum W * t)
    Rule("bn-conv", pattern=(BATCH_NORM, NEXT_CONVS), check=can_fold, build=fold),
]


@register_pass("fold_bn_into_next", exact=True)
def fold_bn_into_next(gm: fx.GraphModule) -> PassResult:
    return rewrite(gm, RULES)
