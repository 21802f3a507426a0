"""TVMModule: the model's call signature and output structure, no copies, clear input errors."""

import pytest
import torch
from torch import nn

from fxopt.codegen.lower import build
from fxopt.codegen.runtime import TVMModule
from fxopt.ir.errors import InputError
from fxopt.testing import assert_equivalent

pytestmark = pytest.mark.tvm


class TwoInTwoOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x, y):
        z = self.conv(x) + y
        return {"z": z, "parts": (z.relu(), z.mean(dim=(2, 3)))}


@pytest.fixture(scope="module")
def compiled(fast_llvm):
    model = TwoInTwoOut().eval()
    inputs = (torch.randn(1, 3, 6, 6), torch.randn(1, 4, 6, 6))
    built = build(model, inputs, fast_llvm)
    return model, TVMModule(built.executable, "llvm")


def test_output_has_the_models_structure_at_any_batch(compiled):
    model, module = compiled
    for batch in (1, 3):
        inputs = (torch.randn(batch, 3, 6, 6), torch.randn(batch, 4, 6, 6))
        out = module(*inputs)
        assert isinstance(out, dict) and isinstance(out["parts"], tuple)
        assert_equivalent(model, module, inputs)


def test_a_single_tensor_output_comes_back_as_a_tensor(fast_llvm):
    conv = nn.Conv2d(2, 2, 1).eval()
    x = torch.randn(2, 2, 3, 3)
    module = TVMModule(build(conv, (x,), fast_llvm).executable, "llvm")
    assert isinstance(module(x), torch.Tensor)
    assert_equivalent(conv, module, (x,))


def test_tensors_cross_by_dlpack_without_copies(compiled):
    _, module = compiled
    seen = {}
    main = module._main

    def spy(*args):
        seen["inputs"] = [a.data_ptr() for a in args]
        seen["result"] = result = main(*args)
        return result

    module._main = spy
    try:
        x, y = torch.randn(2, 3, 6, 6), torch.randn(2, 4, 6, 6)
        out = module(x, y)
    finally:
        module._main = main
    assert seen["inputs"] == [x.data_ptr(), y.data_ptr()]  # the VM reads the caller's memory
    assert out["z"].data_ptr() == seen["result"][0].data_ptr()  # torch owns the VM's buffer


def test_non_contiguous_inputs_are_made_contiguous(compiled):
    model, module = compiled
    x = torch.randn(2, 3, 6, 6).transpose(2, 3)
    y = torch.randn(2, 4, 6, 6)
    assert not x.is_contiguous()
    assert_equivalent(model, module, (x, y))


@pytest.mark.parametrize(
    ("x", "message"),
    [
        (torch.randn(1, 3, 6, 6, dtype=torch.float64), "float64.*compiled for torch.float32"),
        (torch.randn(1, 3, 6), "3 dimensions"),
        (torch.randn(1, 3, 7, 6), "size 7 in dimension 2"),
        (torch.randn(1, 3, 6, 6, device="meta"), "on meta"),
    ],
)
def test_wrong_inputs_raise_input_errors_that_say_what_to_do(compiled, x, message):
    _, module = compiled
    with pytest.raises(InputError, match=message):
        module(x, torch.randn(1, 4, 6, 6))


def test_wrong_number_of_inputs_is_an_input_error(compiled):
    _, module = compiled
    with pytest.raises(InputError, match="takes 2 tensor input"):
        module(torch.randn(1, 3, 6, 6))
