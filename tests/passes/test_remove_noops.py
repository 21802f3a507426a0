import pytest
import torch
import torch.nn.functional as F
from helpers import remaining_ops
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fxopt
from fxopt.passes.remove_noops import remove_noops, same_shape
from fxopt.testing import apply_pass, assert_declines, count_ops, graph_of

aten = torch.ops.aten

# name -> (function, the op it leaves in the graph); each is the identity on its input.
NOOPS = {
    "dropout": (lambda x: F.dropout(x, 0.3, training=False), aten.dropout),
    "alpha-dropout": (lambda x: F.alpha_dropout(x, 0.2, training=False), aten.alpha_dropout),
    "feature-dropout": (lambda x: torch.feature_dropout(x, 0.1, False), aten.feature_dropout),
    "clone": (lambda x: x.clone(), aten.clone),
    "detach": (lambda x: x.detach(), aten.detach),
    "alias": (lambda x: aten.alias(x), aten.alias),
    "to-same-dtype": (lambda x: x.to(x.dtype), aten.to),
    "to-same-device": (lambda x: x.to(x.device), aten.to),
    "type-as": (lambda x: x.type_as(x), aten.type_as),
    "view": (lambda x: x.view(x.shape), aten.view),
    "reshape": (lambda x: x.reshape(x.shape), aten.reshape),
    "flatten": (lambda x: x.flatten(1, 1), aten.flatten),
    "unflatten": (lambda x: x.unflatten(1, (x.shape[1],)), aten.unflatten),
    "expand": (lambda x: x.expand(x.shape), aten.expand),
    "expand-minus-one": (lambda x: x.expand(*([-1] * x.dim())), aten.expand),
    "repeat-once": (lambda x: x.repeat(*([1] * x.dim())), aten.repeat),
    "permute": (lambda x: x.permute(*range(x.dim())), aten.permute),
    "transpose": (lambda x: x.transpose(1, -x.dim() + 1), aten.transpose),
    "times-one": (lambda x: x * 1, aten.mul),
    "times-one-float": (lambda x: x * 1.0, aten.mul),
    "plus-zero": (lambda x: x + 0, aten.add),
    "minus-zero": (lambda x: x - 0.0, aten.sub),
    "divided-by-one": (lambda x: x / 1, aten.div),
}
# Ops that are not no-ops, kept in the chain to check the pass leaves them alone.
KEPT = {
    "relu": (torch.relu, aten.relu),
    "times-two": (lambda x: x * 2, aten.mul),
    "plus-one": (lambda x: x + 1, aten.add),
}


class Chain(nn.Module):
    def __init__(self, steps):
        super().__init__()
        self.steps = list(steps)

    def forward(self, x):
        for step in self.steps:
            x = {**NOOPS, **KEPT}[step][0](x)
        return x


class ConvThenNoops(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        y = self.drop(self.conv(x)).clone()
        return y.view(y.shape[0], 4, y.shape[2], y.shape[3]) * 1 + 0


class Step(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def test_remove_noops_removes_every_noop_and_counts_match_applied():
    result = apply_pass(remove_noops, Chain(NOOPS), torch.randn(2, 3, 4))
    gm = result.graph_module
    assert sum(result.applied.values()) == len(NOOPS)
    assert result.applied == {
        "eval-dropout": 3,
        "identity-copy": 6,
        "same-shape-view": 7,
        "identity-permute": 2,
        "neutral-scalar": 5,
    }
    assert count_ops(gm, *{op for _, op in NOOPS.values()}) == 0


def test_remove_noops_removes_views_to_the_same_symbolic_shape():
    result = apply_pass(remove_noops, ConvThenNoops(), torch.randn(2, 3, 8, 8), dynamic_batch=True)
    assert result.applied == {
        "eval-dropout": 1,
        "identity-copy": 1,
        "same-shape-view": 1,
        "neutral-scalar": 2,
    }
    assert count_ops(result.graph_module, aten.conv2d) == 1
    assert remaining_ops(result.graph_module) == ["conv2d"]


def test_same_shape_compares_symbolic_sizes_without_guessing():
    gm = graph_of(ConvThenNoops(), torch.randn(2, 3, 8, 8), dynamic_batch=True)
    conv = next(n for n in gm.graph.nodes if n.target is aten.conv2d.default)
    shape = conv.meta["val"].shape
    assert same_shape(shape, shape)
    assert not same_shape(shape, (2, *shape[1:]))  # the batch is symbolic: not provably 2
    assert not same_shape(shape, shape[1:])


def test_remove_noops_on_zoo_model_wrapped_in_noops_matches_eager():
    if "vit_bn_like" not in fxopt.models.list():
        pytest.skip("vit_bn_like is not in the zoo yet")
    model = nn.Sequential(
        nn.Dropout(0.1),
        Chain(["clone", "view"]),
        fxopt.models.create("vit_bn_like"),
        nn.Dropout(0.2),
    )
    (x,) = fxopt.models.example_inputs("vit_bn_like", batch=2)
    before = graph_of(model, x)
    result = apply_pass(remove_noops, model, x)
    assert result.applied == {"eval-dropout": 2, "identity-copy": 1, "same-shape-view": 1}
    assert count_ops(result.graph_module, aten.dropout, aten.clone) == 0
    assert count_ops(result.graph_module, aten.linear) == count_ops(before, aten.linear)


def test_remove_noops_keeps_contiguous_after_a_transpose():
    # the copy makes the result contiguous, as a caller's `.view` on it needs (swin, davit)
    model = Step(lambda x: x.transpose(1, 2).contiguous())
    result = apply_pass(remove_noops, model, torch.randn(2, 3, 4))
    assert result.applied == {}
    assert remaining_ops(result.graph_module) == ["contiguous", "transpose"]
    assert result.graph_module(torch.randn(2, 3, 4)).is_contiguous()


def test_remove_noops_is_idempotent():
    gm = remove_noops(graph_of(Chain(NOOPS), torch.randn(2, 3, 4))).graph_module
    again = remove_noops(gm)
    assert not again.modified and again.applied == {}


class TrainingDropout(nn.Module):
    def forward(self, x):
        return F.dropout(x, 0.5, training=True) + 1


class ClonedThenWritten(nn.Module):
    """Removing the clone would let the write into the input `x` show through `y`."""

    def forward(self, x):
        y = x.clone()
        x.add_(1)  # a write into an input: the capture keeps it in place
        return y + x


class ViewThenWritten(nn.Module):
    def forward(self, x):
        y = x.view(x.shape)
        y.mul_(3)  # writes the input through a view: kept in place
        return x + y


@pytest.mark.parametrize(
    "model, x",
    [
        (TrainingDropout(), torch.randn(2, 3)),
        (Chain(["relu"]), torch.randn(2, 3)),
        (ClonedThenWritten(), torch.randn(2, 3)),
        (ViewThenWritten(), torch.randn(2, 3)),
        (nn.Identity(), torch.randn(2, 3)),
    ],
    ids=["training-dropout", "no-noop", "clone-then-written", "view-then-written", "identity"],
)
def test_remove_noops_declines_when_precondition_fails(model, x):
    assert_declines(remove_noops, model, x)


@pytest.mark.parametrize(
    "step",
    [
        lambda x: x.clone(memory_format=torch.channels_last),
        lambda x: x.contiguous(memory_format=torch.channels_last),
        lambda x: x.to(torch.float64),
        lambda x: x.view(x.shape[0], -1),
        lambda x: x.expand(2, *x.shape),
        lambda x: x.permute(0, 1, 3, 2),  # same shape (square), not the identity
        lambda x: x.transpose(2, 3),
        lambda x: x[:, :, 1:],
        lambda x: x * 1.000001,
    ],
    ids=[
        "clone-channels-last",
        "contiguous-channels-last",
        "to-other-dtype",
        "view-other-shape",
        "expand-new-axis",
        "permute-square",
        "transpose-square",
        "slice-narrower",
        "near-one",
    ],
)
def test_remove_noops_declines_ops_that_change_value_layout_or_shape(step):
    assert_declines(remove_noops, Step(step), torch.randn(2, 3, 4, 4))


@pytest.mark.parametrize(
    "step",
    [lambda x: x * 1.0, lambda x: x + 0.0, lambda x: x / 1],
    ids=["times-float-one", "plus-float-zero", "true-divide"],
)
def test_remove_noops_declines_when_the_scalar_promotes_an_integer_tensor(step):
    assert_declines(remove_noops, Step(step), torch.arange(6).reshape(2, 3))


def test_remove_noops_in_optimize_drops_dropout_and_matches_eager():
    model = ConvThenNoops().eval()
    x = torch.randn(2, 3, 8, 8)
    opt = fxopt.optimize(model, x)  # the default pipeline
    record = next(p for p in opt.report.passes if p.name == "remove_noops")
    assert record.status == "applied", str(opt.report)
    after = opt.report.after.op_counts
    assert not {"dropout", "clone", "view"} & set(after)
    assert after.get("mul", 0) == 0 and after.get("add", 0) == 0
    torch.testing.assert_close(opt(x), model(x), rtol=1e-5, atol=1e-6)


@st.composite
def noop_chains(draw):
    rank = draw(st.integers(2, 4))
    steps = draw(st.lists(st.sampled_from(sorted({**NOOPS, **KEPT})), min_size=1, max_size=6))
    shape = [draw(st.integers(1, 4)) for _ in range(rank)]
    shape[0] = draw(st.integers(2, 4))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    return steps, torch.randn(shape, dtype=dtype, generator=generator), draw(st.booleans())


@settings(max_examples=200, deadline=None)
@given(noop_chains())
def test_remove_noops_property_random_chains_lose_exactly_their_noops(case):
    steps, x, dynamic = case
    result = apply_pass(remove_noops, Chain(steps), x, dynamic_batch=dynamic)
    noops = [s for s in steps if s in NOOPS]
    assert sum(result.applied.values()) == len(noops)
    kept = sorted(KEPT[s][1].__name__ for s in steps if s in KEPT)
    assert remaining_ops(result.graph_module) == kept


class ContiguousBeforeView(nn.Module):
    """swin / maxvit / davit: a window partition permutes, then `.contiguous().view(...)`."""

    def forward(self, x):
        b, c, h, w = x.shape
        windows = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 3, 5, 1)
        return windows.contiguous().view(-1, 4, c) * 2


def test_remove_noops_keeps_contiguous_when_its_input_is_not_contiguous():
    result = apply_pass(remove_noops, ContiguousBeforeView(), torch.randn(2, 3, 4, 4))
    assert count_ops(result.graph_module, aten.contiguous) == 1
    assert any("not contiguous" in miss for miss in result.declined["identity-copy"])


def test_remove_noops_drops_contiguous_of_a_contiguous_value():
    class Model(nn.Module):
        def forward(self, x):
            return (x * 2).contiguous().view(-1)

    result = apply_pass(remove_noops, Model(), torch.randn(2, 3))
    assert count_ops(result.graph_module, aten.contiguous) == 0
