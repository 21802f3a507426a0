"""The captured graph is functional where the model's in-place writes are unobservable, and
keeps (and reports) the writes a caller or another view can see."""

import copy

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

import fxopt
from fxopt.capture import capture
from fxopt.testing import assert_equivalent

aten = torch.ops.aten


def captured(model, *inputs):
    return capture(copy.deepcopy(model).eval(), inputs, dynamic_batch=False)


def in_place_ops(gm) -> list[str]:
    return [
        str(n.target)
        for n in gm.graph.nodes
        if n.op == "call_function" and getattr(n.target, "_schema", None) is not None
        if n.target._schema.is_mutable
    ]


class RepBlock(nn.Module):
    """timm's RepVGG / MobileOne idiom: `out += branch(x)` on a fresh sum, then `relu_`."""

    def __init__(self, c=4):
        super().__init__()
        self.a, self.b = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 1)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        out = self.bn(x)
        out += self.a(x)
        out += self.b(x)
        return out.relu_()


class ViewReadAfterWrite(nn.Module):
    def forward(self, x):
        t = x * 2
        flat = t.view(-1)
        t.add_(1)
        return flat * 3


class WriteIntoDeadBaseView(nn.Module):
    def forward(self, x):
        t = x * 2
        v = t.flatten(1)
        v.relu_()
        return v + 1


class WritesInput(nn.Module):
    def forward(self, x):
        x.mul_(2)
        return x + 1


class CountsCalls(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls.add_(1)
        return x * 2


class PromotingWrite(nn.Module):
    def forward(self, x):
        h = (x * 2).to(torch.float16)
        h += x  # float32 operand: the in-place result stays float16
        return h


class CopyIntoFresh(nn.Module):
    def forward(self, x):
        out = torch.empty_like(x)
        out.copy_(x.sigmoid())
        return out * x


X = torch.randn(2, 4, 6, 6)


def test_rep_block_sums_become_functional_adds():
    model = RepBlock().eval()
    result = captured(model, X)
    assert in_place_ops(result.graph_module) == []
    assert result.kept_in_place == []
    assert_equivalent(model, result.graph_module, (X,), n_random=1)


def test_a_view_read_after_the_write_keeps_the_write_and_says_why():
    result = captured(ViewReadAfterWrite(), X)
    assert in_place_ops(result.graph_module) == ["aten.add_.Tensor"]
    [note] = result.kept_in_place
    assert "shares its memory and is read after the write" in note
    assert_equivalent(ViewReadAfterWrite(), result.graph_module, (X,))


def test_a_write_into_a_view_of_a_dead_base_becomes_functional():
    result = captured(WriteIntoDeadBaseView(), X)
    assert in_place_ops(result.graph_module) == []
    assert_equivalent(WriteIntoDeadBaseView(), result.graph_module, (X,), n_random=1)


def test_a_write_into_an_input_is_kept_and_the_caller_sees_it():
    result = captured(WritesInput(), X)
    assert in_place_ops(result.graph_module) == ["aten.mul_.Tensor"]
    assert "writes into an input" in result.kept_in_place[0]
    x = X.clone()
    result.graph_module(x)
    torch.testing.assert_close(x, X * 2)


def test_a_write_into_a_buffer_is_kept_and_reported_by_optimize():
    fast = fxopt.optimize(CountsCalls(), X, verify=False)
    assert any("writes into a parameter or buffer" in note for note in fast.report.notes)
    assert any("aten.add_" in line for line in in_place_ops(fast.graph_module))


def test_a_promoting_write_keeps_the_written_dtype():
    result = captured(PromotingWrite(), X)
    assert in_place_ops(result.graph_module) == []
    out = result.graph_module(X)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out, PromotingWrite()(X))


def test_copy_into_a_fresh_tensor_becomes_functional():
    result = captured(CopyIntoFresh(), X)
    assert in_place_ops(result.graph_module) == []
    assert_equivalent(CopyIntoFresh(), result.graph_module, (X,), n_random=1)


def test_functionalizing_twice_changes_nothing():
    from fxopt.functionalize import functionalize

    gm = captured(RepBlock().eval(), X).graph_module
    code = gm.code
    assert functionalize(gm) == []
    assert gm.code == code


# One step of a random program on a list of live values: an in-place op on one of them, a view
# of one, or a functional op making a fresh value.
STEP = st.tuples(
    st.sampled_from(["add_", "mul_", "relu_", "view", "transpose", "fresh", "copy_"]),
    st.integers(0, 7),
    st.integers(0, 7),
)


class RandomProgram(nn.Module):
    def __init__(self, steps):
        super().__init__()
        self.steps = steps

    def forward(self, x):
        values = [x * 1.5]
        for op, i, j in self.steps:
            a, b = values[i % len(values)], values[j % len(values)]
            if op == "view":
                values.append(a.view(a.shape))
            elif op == "transpose":
                values.append(a.transpose(-1, -2))
            elif op == "fresh":
                values.append(a.sin() + 0.5)
            elif op == "relu_":
                values.append(a.relu_())
            elif a.shape == b.shape:
                values.append(getattr(a, op)(b))
        return tuple(v * 1 for v in values)  # every value, views included, is read at the end


@settings(max_examples=60, deadline=None)
@given(st.lists(STEP, min_size=1, max_size=8))
def test_random_in_place_programs_keep_their_meaning(steps):
    x = torch.randn(3, 3)
    model = RandomProgram(steps)
    try:
        expected = model(x.clone())
    except RuntimeError:  # eager refuses a write whose operand overlaps the written memory
        assume(False)
    result = captured(model, x)
    got = result.graph_module(x.clone())
    for e, g in zip(expected, got, strict=True):
        torch.testing.assert_close(g, e, equal_nan=True)


@pytest.mark.parametrize(
    "act",
    [nn.Hardswish(inplace=True), nn.ReLU6(inplace=True), nn.SiLU(inplace=True), torch.sigmoid_],
)
def test_common_activation_writes_become_functional(act):
    class Act(nn.Module):
        def forward(self, x):
            y = x * 2
            act(y)
            return y

    result = captured(Act(), X)
    assert in_place_ops(result.graph_module) == []
    assert_equivalent(Act(), result.graph_module, (X,), n_random=1)
