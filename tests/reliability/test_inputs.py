"""The call contract, from the arguments' side: an optimized model gives the model's results for
every call it accepts, and a typed `InputError` saying what differs (and what to do) for every
call it does not. Each test is the call a hostile user would make."""

import pytest
import torch
from torch import nn

import fxopt
from fxopt.ir.errors import InputError
from fxopt.verify import input_sets, random_like


class Scaled(nn.Module):
    """A linear layer scaled by a Python number, with an optional boolean mask."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x, k=2, mask=None):
        y = self.linear(x) * k
        return y if mask is None else y.masked_fill(mask, 0.0)


@pytest.fixture(scope="module")
def scaled():
    torch.manual_seed(0)
    model = Scaled().eval()
    x = torch.randn(3, 4)
    return model, x, fxopt.optimize(model, (x, 2, None))


def test_a_non_tensor_argument_other_than_its_example_value_raises_input_error(scaled):
    model, x, fast = scaled
    with pytest.raises(InputError, match=r"argument 'k': the model was optimized for k=2.*got 3"):
        fast(x, 3, None)
    with pytest.raises(InputError, match="got 2.0"):  # 2.0 is not the int 2 the graph holds
        fast(x, 2.0, None)


def test_a_mask_where_the_example_had_none_raises_input_error(scaled):
    model, x, fast = scaled
    mask = torch.rand(3, 4) > 0.5
    with pytest.raises(InputError, match=r"optimized for mask=None.*got bool tensor \(3, 4\)"):
        fast(x, 2, mask)


def test_omitting_arguments_whose_defaults_equal_the_example_values_works(scaled):
    model, x, fast = scaled
    torch.testing.assert_close(fast(x, 2), model(x))
    torch.testing.assert_close(fast(x), model(x))
    torch.testing.assert_close(fast(x=x, k=2), model(x))


def test_an_omitted_argument_whose_default_differs_from_the_example_raises_input_error():
    model, x = Scaled().eval(), torch.randn(3, 4)
    fast = fxopt.optimize(model, (x, 3))
    torch.testing.assert_close(fast(x, 3), model(x, 3))
    with pytest.raises(InputError, match=r"optimized for k=3.*got 2"):
        fast(x)  # k takes its default, 2


def test_an_argument_left_out_of_the_example_must_keep_its_default():
    model, x = Scaled().eval(), torch.randn(3, 4)
    fast = fxopt.optimize(model, (x,))
    torch.testing.assert_close(fast(x, 2, None), model(x))
    with pytest.raises(InputError, match=r"'k' was not among the example inputs.*default k=2"):
        fast(x, k=5)


def test_extra_positional_or_keyword_arguments_raise_input_error(scaled):
    model, x, fast = scaled
    with pytest.raises(InputError, match=r"does not match Scaled.forward\(x, k=2, mask=None\)"):
        fast(x, 2, None, 5)
    with pytest.raises(InputError, match="unexpected keyword argument 'scale'"):
        fast(x, scale=5)
    with pytest.raises(InputError, match="missing a required argument: 'x'"):
        fast()


def test_extra_arguments_raise_input_error_in_the_dynamo_fallback_too():
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(4, 4)

        def forward(self, x, k=2):
            y = self.linear(x)
            return y * k if y.sum() > 0 else -y  # torch.export cannot capture this

    model, x = DataDependent().eval(), torch.randn(3, 4)
    fast = fxopt.optimize(model, (x,))
    assert fast.report.capture == "dynamo fallback"
    torch.testing.assert_close(fast(x, k=3), model(x, k=3))  # Dynamo specializes on k itself
    with pytest.raises(InputError, match="too many positional arguments"):
        fast(x, 2, 5)


def test_a_nested_tensor_of_another_shape_is_named_by_its_path():
    class Pair(nn.Module):
        def forward(self, pair, scale: float):
            return pair["a"] * scale + pair["b"]

    args = ({"a": torch.randn(2, 3), "b": torch.randn(2, 3)}, 2.0)
    fast = fxopt.optimize(Pair(), args)
    torch.testing.assert_close(fast(*args), Pair()(*args))
    with pytest.raises(InputError, match=r"argument \"pair\['a'\]\".*got torch.float32 \(2, 4\)"):
        fast({"a": torch.randn(2, 4), "b": torch.randn(2, 3)}, 2.0)


class BatchOneBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x):
        if x.shape[0] == 1:  # a batch of one takes another path
            return self.linear(x) * 100
        return self.linear(x)


def test_a_model_that_branches_on_batch_one_rejects_batch_one_when_optimized_at_batch_four():
    model = BatchOneBranch().eval()
    fast = fxopt.optimize(model, torch.randn(4, 4))
    assert fast.report.dynamic_batch
    assert any("dynamic batch >= 2" in note for note in fast.report.notes)
    x3 = torch.randn(3, 4)
    torch.testing.assert_close(fast(x3), model(x3))
    with pytest.raises(InputError, match=r"B: any batch size >= 2.*got torch.float32 \(1, 4\)"):
        fast(torch.randn(1, 4))


def test_a_model_that_branches_on_batch_one_optimized_at_batch_one_is_exact_at_batch_one():
    model = BatchOneBranch().eval()
    fast = fxopt.optimize(model, torch.randn(1, 4))
    assert not fast.report.dynamic_batch
    assert any("differently at batch size 1" in note for note in fast.report.notes)
    x1 = torch.randn(1, 4)
    torch.testing.assert_close(fast(x1), model(x1))


def test_a_model_that_ignores_the_batch_size_stays_dynamic_down_to_batch_one():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    fast = fxopt.optimize(model, torch.randn(4, 4))
    assert fast.report.dynamic_batch
    for batch in (1, 2, 7):
        x = torch.randn(batch, 4)
        torch.testing.assert_close(fast(x), model(x))


def test_an_empty_batch_is_accepted_only_where_the_model_agrees_at_batch_zero():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    fast = fxopt.optimize(model, torch.randn(4, 4))
    assert fast(torch.randn(0, 4)).shape == (0, 2)

    class Flatten(nn.Module):  # eager cannot view an empty batch as (0, -1)
        def forward(self, x):
            return x.view(x.shape[0], -1) * 2

    fast = fxopt.optimize(Flatten(), torch.randn(4, 2, 2))
    x = torch.randn(1, 2, 2)
    torch.testing.assert_close(fast(x), Flatten()(x))
    with pytest.raises(InputError, match=r"B: any batch size >= 1.*got torch.float32 \(0, 2, 2\)"):
        fast(torch.randn(0, 2, 2))


def test_a_static_batch_message_does_not_promise_any_batch_size():
    fast = fxopt.optimize(nn.Linear(4, 4).eval(), torch.randn(2, 4), dynamic_batch=False)
    with pytest.raises(InputError, match=r"shape \(2, 4\), got") as raised:
        fast(torch.randn(3, 4))
    assert "any batch size" not in str(raised.value)


def test_example_inputs_none_raises_input_error():
    with pytest.raises(InputError, match="example_inputs is None; pass the model's arguments"):
        fxopt.optimize(nn.Linear(4, 4).eval(), None)


def test_an_example_the_model_rejects_raises_input_error_with_the_models_message():
    model = nn.Linear(4, 4).eval()
    for verify in (True, False):
        with pytest.raises(InputError, match=r"Linear rejected the example inputs: .*2x5 and 4x4"):
            fxopt.optimize(model, torch.randn(2, 5), verify=verify)


def test_passes_given_as_one_name_runs_that_one_pass():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    model[1].running_mean.normal_()
    fast = fxopt.optimize(model, torch.randn(2, 3, 8, 8), passes="fold_conv_bn")
    assert [p.name for p in fast.report.passes] == ["fold_conv_bn"]
    assert "batch_norm" not in fast.report.after.op_counts


def test_passes_of_another_type_raise_input_error():
    with pytest.raises(InputError, match="passes= takes a list of pass names in order"):
        fxopt.optimize(nn.Linear(4, 4).eval(), torch.randn(2, 4), passes={"fold_conv_bn"})


def test_optimize_leaves_the_callers_example_tensors_unchanged():
    class ClampsInput(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(4, 4)

        def forward(self, x):
            x.relu_()  # writes into its input
            return self.linear(x)

    model, x = ClampsInput().eval(), torch.randn(2, 4)
    before = x.clone()
    fast = fxopt.optimize(model, x)
    assert torch.equal(x, before)
    mine, theirs = x.clone(), x.clone()
    torch.testing.assert_close(fast(mine), model(theirs))
    torch.testing.assert_close(mine, theirs)  # the optimized model writes into it as well


def test_random_inputs_for_a_bool_padding_mask_are_valid_masks_of_the_new_batch():
    mask = torch.tensor([[False, False, True], [False, True, True]])
    example = (torch.randn(2, 3, 8), mask)
    fresh = random_like(example, seed=0, batch=5)[1]
    assert fresh.shape == (5, 3) and fresh.dtype == torch.bool
    assert not fresh.all(dim=1).any()  # no row masks every position
    assert all(torch.equal(s[1], mask) for s in input_sets(example, n_random=2))


def test_random_inputs_for_an_additive_float_mask_stay_zero_or_its_minimum():
    lowest = torch.finfo(torch.float32).min
    mask = torch.zeros(2, 1, 5)
    mask[1, :, 3:] = lowest  # as Hugging Face writes a padding mask
    for fresh in (random_like((mask,), seed=0)[0], random_like((mask,), seed=1, batch=3)[0]):
        assert torch.isfinite(fresh).all()
        assert ((fresh == 0) | (fresh == lowest)).all() and not (fresh == lowest).all(-1).any()
