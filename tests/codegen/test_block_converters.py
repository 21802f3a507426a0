import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

pytest.importorskip("tvm")

import fxopt  # noqa: E402
from fxopt.codegen import block_converters, lower, schedule_blocks  # noqa: E402
from fxopt.codegen import tvm_api as tv  # noqa: E402
from fxopt.ir.block_ops import ON_CHIP_BYTES  # noqa: E402
from fxopt.passes.fold_conv_bn import fold_conv_bn  # noqa: E402
from fxopt.passes.fuse_blocks import fuse_blocks  # noqa: E402
from fxopt.testing import assert_equivalent, graph_of  # noqa: E402

pytestmark = pytest.mark.tvm

ACTS = {"none": nn.Identity, "relu6": nn.ReLU6, "gelu": nn.GELU, "hardswish": nn.Hardswish}


class DwPw(nn.Module):
    def __init__(self, channels, out, kernel=3, stride=1, acts=("relu6", "none"), dilation=1):
        super().__init__()
        pad = dilation * (kernel // 2)
        self.dw = nn.Conv2d(channels, channels, kernel, stride, pad, dilation, groups=channels)
        self.pw = nn.Conv2d(channels, out, 1, bias=False)
        self.acts = nn.ModuleList(ACTS[a]() for a in acts)

    def forward(self, x):
        return self.acts[1](self.pw(self.acts[0](self.dw(x))))


class Inverted(nn.Module):
    def __init__(self, channels, hidden, kernel=3, stride=1, acts=("relu6", "relu6", "none")):
        super().__init__()
        self.expand = nn.Conv2d(channels, hidden, 1)
        self.block = DwPw(hidden, channels, kernel, stride, acts[1:])
        self.act = ACTS[acts[0]]()
        self.residual = stride == 1

    def forward(self, x):
        out = self.block(self.act(self.expand(x)))
        return x + out if self.residual else out


def fused_graph(model, x):
    result = fuse_blocks(graph_of(model.eval(), x, dynamic_batch=True))
    assert sum(result.applied.values()) == 1
    return result.graph_module


def lowered(gm, x, target):
    """`fxopt.codegen.lower` up to the build: (scheduled module, executable)."""
    exported, _, _ = lower.export(gm, (x,), dynamic_batch=True)
    target = tv.make_target(target)
    scheduled = lower.lower(lower.import_program(exported), target)
    assert all(
        schedule_blocks.SCHEDULED_ATTR in f.attrs for f in block_functions(scheduled).values()
    )
    return scheduled, tv.compile_module(scheduled, target)


def run_llvm(executable, x):
    vm = tv.virtual_machine(executable, tv.tvm.cpu())
    out = tv.to_torch(vm["main"](tv.from_torch(x.contiguous())))
    return out[0] if isinstance(out, tuple) else out


def block_functions(mod) -> dict:
    """The PrimFuncs of `mod` made from a fused-block op, by name."""
    return {
        gvar.name_hint: func
        for gvar, func in mod.functions.items()
        if isinstance(func, tv.tirx.PrimFunc)
        and func.attrs
        and block_converters.BLOCK_ATTR in func.attrs
    }


@st.composite
def cases(draw):
    kernel, stride = draw(st.sampled_from([3, 5, 7])), draw(st.sampled_from([1, 2]))
    channels, size = draw(st.integers(1, 12)), draw(st.integers(4, 13))
    acts = tuple(draw(st.lists(st.sampled_from(sorted(ACTS)), min_size=3, max_size=3)))
    if draw(st.booleans()):
        dilation = draw(st.sampled_from([1, 2]))
        model = DwPw(channels, draw(st.integers(1, 12)), kernel, stride, acts[:2], dilation)
    else:
        model = Inverted(channels, draw(st.integers(1, 24)), kernel, stride, acts)
    return model.eval(), torch.randn(2, channels, size, size + draw(st.integers(0, 3)))


def check_llvm(case):
    model, x = case
    mod, executable = lowered(fused_graph(model, x), x, "llvm")
    assert len(block_functions(mod)) == 1
    with torch.no_grad():
        assert_equivalent(model, lambda inp: run_llvm(executable, inp), (x,), n_random=1)
        other_batch = torch.randn(3, *x.shape[1:])  # the batch stays symbolic
        assert_equivalent(model, lambda inp: run_llvm(executable, inp), (other_batch,))


@settings(max_examples=4, deadline=None)
@given(cases())
def test_fused_block_kernel_matches_eager_on_llvm(case):
    check_llvm(case)


@pytest.mark.slow
@settings(max_examples=40, deadline=None)
@given(cases())
def test_fused_block_kernel_matches_eager_on_llvm_slow(case):
    check_llvm(case)


def test_fused_mobilenetv2_matches_eager_on_llvm():
    model = fxopt.models.create("mobilenetv2_like").eval()
    x = fxopt.models.example_inputs("mobilenetv2_like", batch=2)[0]
    gm = fold_conv_bn(graph_of(model, x, dynamic_batch=True)).graph_module
    result = fuse_blocks(gm)
    assert sum(result.applied.values()) == 8
    built = lower.build(result.graph_module, (x,), "llvm")  # the backend's own build
    with torch.no_grad():
        assert_equivalent(model, lambda inp: run_llvm(built.executable, inp), (x,), n_random=1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("model", [DwPw(32, 64, 3), Inverted(16, 96), Inverted(16, 64, 5, 2)])
def test_fused_block_kernel_matches_eager_on_cuda(model):
    x = torch.randn(2, model.expand.in_channels if hasattr(model, "expand") else 32, 20, 20)
    _, executable = lowered(fused_graph(model, x), x, "cuda")
    vm = tv.virtual_machine(executable, tv.device_for("cuda"))

    def run(inp):
        out = tv.to_torch(vm["main"](tv.from_torch(inp.cuda().contiguous())))
        return (out[0] if isinstance(out, tuple) else out).cpu()

    with torch.no_grad():
        assert_equivalent(model, run, (x,), n_random=1)


def test_fused_block_is_marked_scheduled_and_left_alone_by_the_generic_schedules():
    model, x = Inverted(8, 32), torch.randn(2, 8, 10, 10)
    exported, _, _ = lower.export(fused_graph(model, x), (x,), dynamic_batch=True)
    target = tv.make_target("cuda")
    mod = tv.run_passes(lower.import_program(exported), tv.legalize_and_fuse_passes(), target)
    (func,) = block_functions(mod).values()
    assert "tirx.is_scheduled" not in func.attrs
    with target:
        mod = block_converters.schedule(mod, target)
    (name, scheduled) = next(iter(block_functions(mod).items()))
    assert int(scheduled.attrs["tirx.is_scheduled"]) == 1
    again = tv.run_passes(mod, [tv.gpu_default_schedule()], target)
    tv.tvm.ir.assert_structural_equal(again[name], scheduled)


class BlockThenElementwise(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = DwPw(8, 8)

    def forward(self, x):
        return self.block(x) * 2 + 1


def test_fused_block_stays_its_own_function_when_elementwise_ops_follow():
    x = torch.randn(2, 8, 10, 10)
    model = BlockThenElementwise().eval()
    mod, executable = lowered(fused_graph(model, x), x, "llvm")
    (func,) = block_functions(mod).values()  # FuseOps did not fold the multiply-add in
    assert int(func.attrs["tirx.is_scheduled"]) == 1
    with torch.no_grad():
        assert_equivalent(model, lambda inp: run_llvm(executable, inp), (x,))


@pytest.mark.parametrize(
    ("model", "channels"),
    [
        (DwPw(32, 64, 3), 32),
        (DwPw(16, 24, 7, stride=2, acts=("gelu", "hardswish")), 16),
        (Inverted(16, 96), 16),
        (Inverted(32, 192, 5, stride=2), 32),
    ],
    ids=["dw3-pw", "dw7s2-pw", "inverted-residual", "inverted-k5-s2"],
)
def test_fused_block_builds_for_cuda_as_one_kernel(model, channels):
    x = torch.randn(2, channels, 14, 14)
    mod, executable = lowered(fused_graph(model, x), x, "cuda")
    source = tv.source_of(executable)
    assert block_converters.block_kernel_count(source) == 1  # dw and pw math in the same kernel
    assert "__shared__" in source  # the tile of the dw output lives in shared memory
    shared = re.findall(r"__shared__[^;]*?float \w+\[(\d+)\]", source)
    assert 0 < 4 * sum(map(int, shared)) <= ON_CHIP_BYTES
    (func,) = block_functions(mod).values()
    assert func.attrs[block_converters.BLOCK_ATTR] in ("dw_pw_block", "pw_dw_pw_block")


def test_block_kernel_count_counts_distinct_kernels():
    source = (
        'extern "C" __global__ void __launch_bounds__(128) a_kernel(float* x);\n'
        'extern "C" __global__ void __launch_bounds__(128) a_kernel(float* x) {}\n'
        'extern "C" __global__ void b_kernel(float* x) {}\n'
    )
    assert block_converters.block_kernel_count(source) == 2


def test_a_zoo_model_built_for_cuda_has_one_kernel_per_fused_block():
    """MobileNetV2's seven inverted residuals and its dw -> pw stem each run as one kernel;
    the two convs left (stem and head) and the classifier get their own."""
    name = "mobilenetv2_like"
    artifact = fxopt.compile(
        fxopt.models.create(name), fxopt.models.example_inputs(name), target="cuda"
    )
    fused = {op: n for op, n in artifact.report.after.op_counts.items() if op.startswith("fxopt")}
    assert fused == {"fxopt::dw_pw_block": 1, "fxopt::pw_dw_pw_block": 7}
    kernels = block_converters.kernel_names(artifact.source())
    block_kernels = {k for k in kernels if k.startswith("fxopt_")}
    conv_kernels = {k for k in kernels - block_kernels if "conv2d" in k}
    assert len(block_kernels) == sum(fused.values())
    assert len(conv_kernels) == artifact.report.after.op_counts["conv2d"] == 2
