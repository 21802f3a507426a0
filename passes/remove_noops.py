"""remove_noops: placeholder while the pass is written (no change)."""

from torch import fx

from fxopt.registry import register_pass
from fxopt.rewrite import PassResult


@register_pass("remove_noops", exact=True)
def remove_noops(gm: fx.GraphModule) -> PassResult:
    return PassResult(gm, False, {})
