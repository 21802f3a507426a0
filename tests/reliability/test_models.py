"""The call contract, from the models' side: whatever module a user hands to `optimize` (a
stateful one, a compiled or scripted one, one that cannot be deep-copied, one with masks), the
optimized model gives the model's results, or a typed error says why it cannot."""

import copy
import threading

import pytest
import torch
from torch import nn

import fxopt
from fxopt.ir.errors import CaptureError, InputError, VerificationError


class Copies(nn.Module):
    def forward(self, x):
        return x.clone()


def test_an_output_that_copies_the_input_is_not_the_input():
    x = torch.randn(2, 3)
    fast = fxopt.optimize(Copies(), x)
    before = x.clone()
    y = fast(x)
    y += 1
    assert torch.equal(x, before)


def test_an_output_that_copies_the_input_is_not_the_input_through_the_dynamo_fallback_too():
    class BranchThenCopy(nn.Module):  # the data-dependent branch sends optimize to Dynamo
        def forward(self, x):
            y = x * 2 if x.mean() > 0 else x * 0.5
            return y, x.clone()

    x = torch.randn(2, 3)
    fast = fxopt.optimize(BranchThenCopy(), x)
    assert fast.report.capture == "dynamo fallback"
    before = x.clone()
    _, copy = fast(x)
    copy += 1
    assert torch.equal(x, before)


def test_a_graph_break_between_a_tensor_and_its_view_optimizes_through_dynamo():
    class ViewThenBranch(nn.Module):  # the resume frame after the branch gets x and a view
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(2, 2)

        def forward(self, x):
            first = x
            x = x.view(x.shape[0], 2, 2, 2).permute(0, 3, 1, 2).flatten(2).transpose(1, 2)
            x = self.linear(x) if x.mean() > 0 else x * 0.5
            return x, first.clone()

    model, x = ViewThenBranch().eval(), torch.randn(1, 4, 2)
    fast = fxopt.optimize(model, x)
    assert fast.report.capture == "dynamo fallback"
    for got, expected in zip(fast(x), model(x), strict=True):
        torch.testing.assert_close(got, expected)


def test_a_model_neither_export_nor_dynamo_can_trace_raises_capture_error(monkeypatch):
    class Branch(nn.Module):
        def forward(self, x):
            return x * 2 if x.mean() > 0 else x * 0.5

    def dynamo_fails(model, **kwargs):  # as when fake tensors cannot run an op eager can
        def compiled(*args):
            raise torch._dynamo.exc.TorchRuntimeError("fake tensors could not run an op")

        return compiled

    monkeypatch.setattr(torch, "compile", dynamo_fails)
    with pytest.raises(CaptureError, match="neither torch.export nor Dynamo could capture Branch"):
        fxopt.optimize(Branch(), torch.randn(2, 3))


def test_outputs_that_were_distinct_in_the_model_stay_distinct():
    class Twice(nn.Module):
        def forward(self, x):
            y = x * 1.0
            return y, y.clone()

    x = torch.randn(2, 3)
    a, b = fxopt.optimize(Twice(), x)(x)
    a += 1
    torch.testing.assert_close(b, x)
    assert a.data_ptr() != x.data_ptr()


def test_outputs_that_alias_the_input_in_the_model_still_do():
    class Views(nn.Module):
        def forward(self, x):
            return x.view(-1)

    x = torch.randn(2, 3)
    assert fxopt.optimize(nn.Identity(), x)(x) is x
    assert fxopt.optimize(Views(), x)(x).data_ptr() == x.data_ptr()


class Counter(nn.Module):
    """Adds how often it was called: its output depends on its state."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 3)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls += 1
        return self.linear(x) + self.calls


class CounterWithBranch(Counter):
    def forward(self, x):
        y = super().forward(x)
        return y * 2 if y.sum() > 0 else -y  # data-dependent: the Dynamo fallback


@pytest.mark.parametrize("model_type", [Counter, CounterWithBranch])
def test_a_counter_model_optimized_without_verification_starts_from_the_models_state(model_type):
    model, x = model_type().eval(), torch.randn(2, 3)
    fast = fxopt.optimize(model, x, verify=False)
    assert model.calls.item() == 0
    reference = copy.deepcopy(model)
    for _ in range(3):
        torch.testing.assert_close(fast(x), reference(x))


def test_a_counter_model_is_reported_as_not_deterministic():
    with pytest.raises(VerificationError, match=r"not deterministic.*changes buffer\(s\) calls"):
        fxopt.optimize(Counter().eval(), torch.randn(2, 3))


class Noisy(nn.Module):
    def __init__(self, how: str):
        super().__init__()
        self.linear, self.how = nn.Linear(3, 3), how

    def forward(self, x):
        y = self.linear(x)
        if self.how == "rand":
            return y + torch.rand_like(y)
        return nn.functional.dropout(y, 0.5, training=True)  # on even in eval mode


@pytest.mark.parametrize("how", ["rand", "dropout"])
def test_a_random_model_is_reported_as_not_deterministic(how):
    with pytest.raises(VerificationError, match="not deterministic.*draws random numbers"):
        fxopt.optimize(Noisy(how).eval(), torch.randn(2, 3))


def test_a_buffer_that_does_not_change_the_outputs_is_verified_and_restored():
    class CountsCalls(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(3, 3)
            self.register_buffer("calls", torch.zeros((), dtype=torch.long))

        def forward(self, x):
            self.calls += 1
            return self.linear(x)

    model, x = CountsCalls().eval(), torch.randn(2, 3)
    fast = fxopt.optimize(model, x)
    calls = [b for name, b in fast._runner.named_buffers() if b.dtype == torch.long]
    assert [b.item() for b in calls] == [0]
    torch.testing.assert_close(fast(x), model(x))


@pytest.mark.parametrize(
    "wrap", [torch.jit.script, lambda m: torch.jit.trace(m, torch.randn(2, 4))]
)
def test_a_torchscript_model_raises_input_error(wrap):
    with pytest.raises(InputError, match="TorchScript module.*pass the nn.Module"):
        fxopt.optimize(wrap(nn.Linear(4, 4).eval()), torch.randn(2, 4))


def test_a_torch_compiled_model_is_optimized_as_the_module_it_wraps():
    model, x = nn.Linear(4, 4).eval(), torch.randn(2, 4)
    fast = fxopt.optimize(torch.compile(model), x)
    assert any("torch.compile wrapped" in note for note in fast.report.notes)
    torch.testing.assert_close(fast(x), model(x))


def test_a_model_holding_a_lock_is_optimized_through_a_copy_that_shares_it():
    class Locked(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear, self.lock = nn.Linear(4, 4), threading.Lock()

        def forward(self, x):
            with self.lock:
                return self.linear(x)

    model, x = Locked().eval(), torch.randn(2, 4)
    fast = fxopt.optimize(model, x)
    assert any("shares lock" in note for note in fast.report.notes)
    torch.testing.assert_close(fast(x), model(x))


def test_a_spectral_norm_model_after_a_training_step_can_be_optimized():
    model, x = nn.utils.spectral_norm(nn.Linear(4, 4)), torch.randn(2, 4)
    model(x)  # keeps `weight` as a non-leaf tensor, which deepcopy refuses
    model.eval()
    fast = fxopt.optimize(model, x)
    torch.testing.assert_close(fast(x), model(x))


class CausalAttention(nn.Module):
    def __init__(self, tokens: int = 5, dim: int = 8):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.register_buffer("mask", torch.full((tokens, tokens), float("-inf")).triu(1))

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5 + self.mask
        return scores.softmax(-1) @ v


def test_a_causal_minus_inf_mask_buffer_is_accepted_and_verified():
    model, x = CausalAttention().eval(), torch.randn(2, 5, 8)
    fast = fxopt.optimize(model, x)
    assert fast.report.final_error is not None
    fxopt.testing.assert_equivalent(model, fast, torch.randn(3, 5, 8))


def test_nan_in_a_buffer_or_inf_in_a_parameter_is_still_rejected():
    model = CausalAttention().eval()
    model.mask[0, 0] = float("nan")
    with pytest.raises(InputError, match="mask holds NaN"):
        fxopt.optimize(model, torch.randn(2, 5, 8))
    model = CausalAttention().eval()
    with torch.no_grad():
        model.qkv.bias[0] = float("inf")
    with pytest.raises(InputError, match=r"qkv\.bias holds Inf"):
        fxopt.optimize(model, torch.randn(2, 5, 8))


def test_a_transformer_with_a_bool_padding_mask_optimizes_and_matches():
    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)

        def forward(self, x, padding_mask):
            return self.layer(x, src_key_padding_mask=padding_mask)

    model = Encoder().eval()
    mask = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    fast = fxopt.optimize(model, (torch.randn(2, 5, 8), mask))
    assert fast.report.dynamic_batch
    x3, mask3 = (
        torch.randn(3, 5, 8),
        torch.tensor([[False] * 5, [False, True, True, True, True]] * 2)[:3],
    )
    torch.testing.assert_close(fast(x3, mask3), model(x3, mask3), rtol=1e-5, atol=1e-5)


class DoublesItsInput(nn.Module):
    """Writes into its input, and not idempotently: each run on the same tensor doubles it."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x):
        x.mul_(2)
        return self.linear(x)


def test_a_model_that_doubles_its_input_in_place_is_verified_on_fresh_copies():
    model, x = DoublesItsInput().eval(), torch.randn(3, 4)
    fast = fxopt.optimize(model, x)
    assert fast.report.final_error is not None
    mine, theirs = x.clone(), x.clone()
    with torch.no_grad():
        torch.testing.assert_close(fast(mine), model(theirs))
    torch.testing.assert_close(mine, theirs)  # the write into the input is kept, as in eager
