"""Patterns written as PyTorch code: `fxopt.pattern`, `fxopt.wildcards`, replacements."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxopt
from fxopt import Rule, rewrite, wildcards
from fxopt.ir.errors import InputError
from fxopt.ir.graph import constant, val
from fxopt.testing import apply_pass, count_ops, graph_of

aten = torch.ops.aten


def conv_bn(x, w, b, mean, var, gamma, beta):
    return F.batch_norm(F.conv2d(x, w, b), mean, var, gamma, beta, False, 0.1, 1e-5)


def conv_bn_any_eps(x, w, b, mean, var, gamma, beta):
    y = F.conv2d(x, w, b)
    return F.batch_norm(
        y, mean, var, gamma, beta, False, wildcards.scalar(), wildcards.scalar("eps")
    )


CONV_BN = fxopt.pattern(conv_bn)
CONV_BN_ANY_EPS = fxopt.pattern(conv_bn_any_eps)


def matches(pattern, gm):
    rule = Rule("probe", pattern=pattern)
    return [m for node in gm.graph.nodes if (m := rule.match(gm, node)) is not None]


class FunctionalConvBn(nn.Module):
    def __init__(self, eps=1e-5, reuse_conv=False):
        super().__init__()
        self.w, self.b = nn.Parameter(torch.randn(4, 3, 3, 3)), nn.Parameter(torch.randn(4))
        self.gamma, self.beta = nn.Parameter(torch.randn(4)), nn.Parameter(torch.randn(4))
        self.register_buffer("mean", torch.randn(4))
        self.register_buffer("var", torch.rand(4) + 0.5)
        self.eps, self.reuse_conv = eps, reuse_conv

    def forward(self, x):
        y = F.conv2d(x, self.w, self.b)
        out = F.batch_norm(y, self.mean, self.var, self.gamma, self.beta, False, 0.1, self.eps)
        return out + y.mean() if self.reuse_conv else out


def module_conv_bn():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())


X = torch.randn(2, 3, 8, 8)


@pytest.mark.parametrize("model", [FunctionalConvBn, module_conv_bn], ids=["functional", "module"])
def test_pattern_matches_conv_bn_in_functional_and_module_code(model):
    gm = graph_of(model(), X)
    (match,) = matches(CONV_BN, gm)
    assert match.root.target is aten.batch_norm.default
    assert match[0].target is aten.conv2d.default and match["w"] is match[0].args[1]
    assert constant(gm, match["var"]) is not None and match["x"].op == "placeholder"
    assert set(match.bindings) == {"x", "w", "b", "mean", "var", "gamma", "beta"}


def test_pattern_does_not_match_when_an_intermediate_value_has_another_user():
    assert matches(CONV_BN, graph_of(FunctionalConvBn(reuse_conv=True), X)) == []


def test_pattern_literals_match_only_equal_literals_unless_bound_by_a_scalar_wildcard():
    gm = graph_of(FunctionalConvBn(eps=1e-3), X)
    assert matches(CONV_BN, gm) == []
    (match,) = matches(CONV_BN_ANY_EPS, gm)
    assert match["eps"] == pytest.approx(1e-3)


def test_pattern_defaults_of_the_op_are_compared_too():
    strided = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.BatchNorm2d(4))
    assert matches(CONV_BN, graph_of(strided, X)) == []


class MulLinear(nn.Module):
    """x * buffer, x * input, x * 3.0, each feeding a linear."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 5)
        self.register_buffer("c", torch.rand(6) + 0.5)

    def forward(self, x, y):
        return self.fc(x * self.c) + self.fc(x * y) + self.fc(x * 3.0)


def scaled_linear(x, w, b, c: wildcards.Constant):
    return F.linear(x * c, w, b)


def test_any_constant_matches_only_constant_tensors():
    gm = graph_of(MulLinear(), torch.randn(2, 6), torch.randn(2, 6))
    (match,) = matches(fxopt.pattern(scaled_linear), gm)
    assert match["c"].op == "get_attr"


def test_a_plain_parameter_matches_nodes_and_literals_alike():
    def any_scaled_linear(x, w, b, c):
        return F.linear(x * c, w, b)

    gm = graph_of(MulLinear(), torch.randn(2, 6), torch.randn(2, 6))
    found = matches(fxopt.pattern(any_scaled_linear), gm)
    assert [type(m["c"]).__name__ for m in found] == ["Node", "Node", "float"]


ANY_SCALAR = wildcards.any_scalar()


def test_any_scalar_matches_number_literals_and_binds_them():
    def scaled(x, k=ANY_SCALAR):  # a wildcard default works like the annotation k: Scalar
        return x * k

    gm = graph_of(MulLinear(), torch.randn(2, 6), torch.randn(2, 6))
    (match,) = matches(fxopt.pattern(scaled), gm)
    assert match["k"] == 3.0


class Activations(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        return F.relu(self.a(x)) + F.gelu(self.b(x)) + torch.sigmoid(self.c(x))


def test_any_of_matches_each_alternative_op_at_one_node():
    @fxopt.pattern
    def linear_act(x, w, b):
        return wildcards.any_of(F.relu, aten.gelu)(F.linear(x, w, b))

    found = matches(linear_act, graph_of(Activations(), torch.randn(2, 4)))
    assert [m.root.target for m in found] == [aten.relu.default, aten.gelu.default]


def test_a_check_reads_bound_values_by_parameter_name():
    def eps_is_small(match):
        return match["eps"] < 1e-4 or fxopt.decline(f"eps {match['eps']} is large")

    rule = Rule("conv-bn", pattern=CONV_BN_ANY_EPS, check=eps_is_small)
    result = rewrite(graph_of(FunctionalConvBn(eps=1e-3), X), [rule])
    assert result.declined == {"conv-bn": ["batch_norm: eps 0.001 is large"]}


# A user pass in a few lines: x * c -> linear  =>  linear with c folded into the weight.
def folded_linear(x, w, b, c):
    return F.linear(x, w * c, b)


def scale_fits_in_features(match):
    c, w = val(match["c"]), val(match["w"])
    if c.dim() > 1 and c.shape[:-1].numel() != 1:
        return fxopt.decline("the scale varies along more than in_features")
    return c.shape[-1] in (1, w.shape[-1]) or fxopt.decline("the scale broadcasts over x")


FOLD_SCALE = Rule(
    "mul-linear",
    pattern=fxopt.pattern(scaled_linear),
    check=scale_fits_in_features,
    replacement=folded_linear,
)


class ScaledLinears(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.other = nn.Linear(6, 5), nn.Linear(6, 5)
        self.register_buffer("c", torch.rand(6) + 0.5)
        self.register_buffer("rows", torch.rand(2, 6) + 0.5)

    def forward(self, x):
        return self.fc(x * self.c) + self.other(x * self.rows)


def test_replacement_folds_a_constant_multiply_into_the_next_linear():
    result = apply_pass(lambda gm: rewrite(gm, [FOLD_SCALE]), ScaledLinears(), torch.randn(2, 6))
    assert result.applied == {"mul-linear": 1}
    assert count_ops(result.graph_module, aten.mul) == 2  # w * c, and the declined x * rows
    assert result.declined == {
        "mul-linear": ["linear_1 (other): the scale varies along more than in_features"]
    }
    again = rewrite(result.graph_module, [FOLD_SCALE])
    assert not again.modified


def test_replacement_receives_bound_scalars():
    def leaky(x):
        return F.leaky_relu(x, wildcards.scalar("slope"))

    def where_form(x, slope):
        return torch.where(x > 0, x, x * slope)

    rule = Rule("leaky", pattern=fxopt.pattern(leaky), replacement=where_form)
    model = nn.Sequential(nn.Linear(4, 4), nn.LeakyReLU(0.2))
    result = apply_pass(lambda gm: rewrite(gm, [rule]), model, torch.randn(3, 4))
    assert result.applied == {"leaky": 1} and count_ops(result.graph_module, aten.where) == 1


def test_a_replacement_that_changes_the_shape_declines_and_leaves_the_graph_unchanged():
    rule = Rule("bad", pattern=fxopt.pattern(lambda x: F.relu(x)), replacement=lambda x: x.sum(-1))
    gm = graph_of(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), torch.randn(3, 4))
    before = str(gm.graph)
    result = rewrite(gm, [rule])
    assert not result.modified and str(result.graph_module.graph) == before
    (miss,) = result.declined["bad"]
    assert "does not apply" in miss and "[3]" in miss


def test_rule_rejects_a_replacement_with_a_build_or_unbound_parameters():
    with pytest.raises(InputError, match="not both"):
        Rule("r", pattern=CONV_BN, build=lambda m: None, replacement=folded_linear)
    with pytest.raises(InputError, match="fxopt.pattern"):
        Rule("r", pattern=(aten.relu,), replacement=folded_linear)
    rule = Rule("r", pattern=CONV_BN, replacement=lambda x, scale: x * scale)
    with pytest.raises(InputError, match="scale"):
        rewrite(graph_of(module_conv_bn(), X), [rule])


def test_a_scalar_wildcard_must_reach_an_op_unchanged():
    def doubled(x):
        return x * (wildcards.scalar("k") * 2)

    with pytest.raises(InputError, match="unchanged"):
        matches(fxopt.pattern(doubled), graph_of(nn.ReLU(), torch.randn(2)))


def test_pattern_asks_for_examples_when_it_cannot_guess_shapes():
    def shuffle(x):
        return F.pixel_shuffle(x, 3)

    gm = graph_of(nn.Sequential(nn.Conv2d(3, 9, 1), nn.PixelShuffle(3)), X)
    with pytest.raises(InputError, match="examples="):
        matches(fxopt.pattern(shuffle), gm)
    assert len(matches(fxopt.pattern(shuffle, examples={"x": (1, 9, 2, 2)}), gm)) == 1
