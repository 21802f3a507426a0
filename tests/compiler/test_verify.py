import pytest
import torch

from fxopt.ir.errors import VerificationError
from fxopt.testing import assert_equivalent
from fxopt.verify import max_error, random_like, tolerance


def test_tolerance_is_relative_to_output_scale():
    a = torch.full((4,), 1e4)
    assert max_error(a, a + 5e-3) == pytest.approx(5e-3, rel=0.05)  # within 1e-5 * 1e4 + 1e-6
    with pytest.raises(VerificationError, match="exceeds"):
        max_error(a, a + 0.2)


def test_nan_and_inf_count_as_equal_only_at_the_same_places():
    nan, inf = float("nan"), float("inf")
    a = torch.tensor([1.0, nan, -inf, 2.0])  # a fully masked attention row gives NaN in eager
    assert max_error(a, a.clone()) == 0.0
    for b in ([1.0, 1.0, -inf, 2.0], [1.0, nan, inf, 2.0], [nan, nan, -inf, 2.0]):
        with pytest.raises(VerificationError, match="NaN or Inf where"):
            max_error(a, torch.tensor(b))
    with pytest.raises(VerificationError, match="exceeds"):  # the numbers are still checked
        max_error(a, torch.tensor([1.0, nan, -inf, 2.5]))


def test_a_reference_with_no_finite_value_cannot_be_verified():
    a = torch.full((3,), float("nan"))
    with pytest.raises(VerificationError, match="no finite value"):
        max_error(a, a.clone())


def test_candidate_nan_is_a_mismatch():
    with pytest.raises(VerificationError, match="candidate"):
        max_error(torch.ones(3), torch.tensor([1.0, float("inf"), 1.0]))


def test_half_precision_gets_a_looser_tolerance():
    assert tolerance(torch.float16)[0] > tolerance(torch.float32)[0]
    a = torch.ones(8, dtype=torch.float16)
    max_error(a, a + 1e-3)
    with pytest.raises(VerificationError):
        max_error(a.float(), a.float() + 1e-3)


def test_structure_shape_and_dtype_mismatches_are_reported():
    with pytest.raises(VerificationError, match="structure"):
        max_error((torch.ones(2),), [torch.ones(2)])
    with pytest.raises(VerificationError, match="expected"):
        max_error(torch.ones(2), torch.ones(3))
    with pytest.raises(VerificationError, match="integer"):
        max_error(torch.tensor([1, 2]), torch.tensor([1, 3]))


def test_random_inputs_keep_shapes_dtypes_and_integer_ranges():
    x, ids = torch.randn(2, 3) * 5 + 3, torch.tensor([[3, 7, 4]])
    fx, fids = random_like((x, ids), seed=0)
    assert fx.shape == x.shape and not torch.equal(fx, x)
    assert fids.dtype == ids.dtype and fids.min() >= 3 and fids.max() <= 7
    (wider,) = random_like((x,), seed=1, batch=5)
    assert wider.shape == (5, 3)


def test_assert_equivalent_checks_fresh_inputs_too():
    def reference(x):
        return x * 2

    def wrong_on_negatives(x):
        return torch.where(x > -1, x * 2, x)

    x = torch.zeros(1, 64)
    assert_equivalent(reference, wrong_on_negatives, (x,))
    with pytest.raises(VerificationError):
        assert_equivalent(reference, wrong_on_negatives, (torch.randn(1, 64),), n_random=3)
