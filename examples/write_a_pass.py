"""Write a pass and prove it: fold a constant scale into the next linear, on random models."""

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn

import fxopt
from fxopt import Rule, register_pass, rewrite, wildcards


def scaled_linear(x, w, b, c: wildcards.Constant):  # the pattern, written as PyTorch
    return F.linear(x * c, w, b)


def folded(x, w, b, c):  # the replacement; fold_constants then makes `w * c` one constant
    return F.linear(x, w * c, b)


def can_fold(match):  # a scale that varies per row would break the identity
    c = fxopt.graph.val(match["c"])
    return c.shape[:-1].numel() == 1 or fxopt.decline("the scale varies across rows")


RULES = [Rule("mul-linear", fxopt.pattern(scaled_linear), check=can_fold, replacement=folded)]


@register_pass("fold_scale_into_linear", exact=True)
def fold_scale_into_linear(gm):
    return rewrite(gm, RULES)


class ScaledLinear(nn.Module):
    def __init__(self, scale):
        super().__init__()
        self.scale, self.fc = nn.Parameter(scale), nn.Linear(scale.shape[-1], 4)

    def forward(self, x):
        return self.fc(x * self.scale)


@st.composite
def scaled_linears(draw):  # random models that exercise the pass, and some it must decline
    features, rows = draw(st.integers(1, 8)), draw(st.integers(1, 4))
    shape = draw(st.sampled_from([(features,), (1, features), (rows, features)]))
    torch.manual_seed(draw(st.integers(0, 2**16)))
    return ScaledLinear(torch.randn(shape)), (torch.randn(rows, features),)


if __name__ == "__main__":
    print(fxopt.testing.check_pass(fold_scale_into_linear, scaled_linears(), 100, min_fired=10))
