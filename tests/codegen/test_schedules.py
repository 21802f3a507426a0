"""fxopt's own TIR schedules: convolutions are recognized, scheduled, and still compute conv2d."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

tv = pytest.importorskip("fxopt.codegen.tvm_api")
from fxopt.codegen import schedule_conv, schedules  # noqa: E402

pytestmark = pytest.mark.tvm

LLVM = {"kind": "llvm"}  # the generic CPU: the schedules must not depend on the host's


class Conv(torch.nn.Module):
    def __init__(self, weight, bias, stride, padding, dilation, groups, relu):
        super().__init__()
        self.weight = torch.nn.Parameter(weight)
        self.bias = None if bias is None else torch.nn.Parameter(bias)
        self.args = (stride, padding, dilation, groups)
        self.relu = relu

    def forward(self, x):
        y = F.conv2d(x, self.weight, self.bias, *self.args)
        return torch.relu(y) if self.relu else y


def lowered(model, x):
    """The legalized and fused Relax module of `model(x)`, batch static."""
    with torch.no_grad():
        exported = torch.export.export(model.eval(), (x,))
    mod = tv.import_exported_program(exported)
    return tv.run_passes(mod, tv.legalize_and_fuse_passes(), tv.make_target(LLVM))


def prim_funcs(mod) -> dict:
    return {gv.name_hint: f for gv, f in mod.functions_items() if isinstance(f, tv.tirx.PrimFunc)}


def conv_funcs(mod) -> dict:
    return {name: f for name, f in prim_funcs(mod).items() if "conv2d" in name}


def run(mod, target, x):
    vm = tv.virtual_machine(tv.compile_module(mod, target), tv.tvm.cpu())
    (out,) = tv.to_torch(vm["main"](tv.from_torch(x.contiguous())))
    return out


def conv_cases():
    """Conv shapes: channels, kernel 1/3/5/7, stride, padding, dilation, groups, bias, relu."""

    @st.composite
    def case(draw):
        groups_kind = draw(st.sampled_from(["dense", "grouped", "depthwise"]))
        per_group = draw(st.integers(1, 5))
        groups = {"dense": 1, "grouped": draw(st.integers(2, 3)), "depthwise": per_group}[
            groups_kind
        ]
        in_channels = per_group * groups if groups_kind != "depthwise" else per_group
        groups = in_channels if groups_kind == "depthwise" else groups
        out_channels = groups * (1 if groups_kind == "depthwise" else draw(st.integers(1, 6)))
        kernel = draw(st.sampled_from([1, 3, 5, 7]))
        dilation = draw(st.sampled_from([1, 2]))
        padding = draw(st.integers(0, kernel // 2 * dilation))
        span = dilation * (kernel - 1) + 1
        height = draw(st.integers(max(1, span - 2 * padding), 13))
        width = draw(st.integers(max(1, span - 2 * padding), 19))
        return dict(
            shape=(1, in_channels, height, width),
            weight=(out_channels, in_channels // groups, kernel, kernel),
            stride=draw(st.sampled_from([1, 2])),
            padding=padding,
            dilation=dilation,
            groups=groups,
            bias=draw(st.booleans()),
            relu=draw(st.booleans()),
        )

    return case()


@settings(max_examples=15, deadline=None)
@given(conv_cases())
def test_scheduled_conv_matches_torch_conv2d(case):
    check_scheduled_conv(case)


@pytest.mark.slow
@settings(max_examples=200, deadline=None)
@given(conv_cases())
def test_scheduled_conv_matches_torch_conv2d_on_many_shapes(case):
    check_scheduled_conv(case)


def check_scheduled_conv(case):
    torch.manual_seed(0)
    x = torch.randn(case["shape"])
    weight = torch.randn(case["weight"])
    bias = torch.randn(case["weight"][0]) if case["bias"] else None
    args = (case["stride"], case["padding"], case["dilation"], case["groups"])
    model = Conv(weight, bias, *args, case["relu"])
    mod = lowered(model, x)
    scheduled = schedules.apply(mod, LLVM)
    convs = conv_funcs(scheduled)
    assert convs and all("tirx.is_scheduled" in f.attrs for f in convs.values())
    expected = F.conv2d(x, weight, bias, *args)
    expected = torch.relu(expected) if case["relu"] else expected
    actual = run(scheduled, tv.make_target(LLVM), x)
    np.testing.assert_allclose(actual.numpy(), expected.numpy(), rtol=1e-4, atol=1e-4)


def conv_bias_relu_module(channels=8, groups=1, size=16):
    weight = torch.randn(channels, channels // groups, 3, 3)
    model = Conv(weight, torch.randn(channels), 1, 1, 1, groups, relu=True)
    return lowered(model, torch.randn(1, channels, size, size))


@pytest.mark.parametrize("groups", [1, 8], ids=["dense", "depthwise"])
def test_scheduled_conv_is_parallel_and_vectorized_with_the_epilogue_in_the_tile(groups):
    mod = schedules.apply(conv_bias_relu_module(groups=groups), LLVM)
    (func,) = conv_funcs(mod).values()
    sch = tv.s_tir.Schedule(func)
    conv = "conv2d_nchw_update" if groups == 1 else "group_conv2d_nchw_update"
    conv_loops = [sch.get(loop) for loop in sch.get_loops(sch.get_sblock(conv))]
    epilogue_loops = [sch.get(loop) for loop in sch.get_loops(sch.get_sblock("compute"))]
    kinds = tv.tirx.ForKind
    assert conv_loops[0].kind == kinds.PARALLEL
    assert conv_loops[-1].kind == kinds.VECTORIZED and epilogue_loops[-1].kind == kinds.VECTORIZED
    # bias and relu run inside the conv's tile loop, not as a second pass over the output
    assert epilogue_loops[0].same_as(conv_loops[0]) and epilogue_loops[1].same_as(conv_loops[1])
    assert 'scope="local"' in func.script()  # partial sums stay in registers


def test_scheduled_conv_recognizes_dense_grouped_and_depthwise():
    sch = tv.s_tir.Schedule(next(iter(conv_funcs(conv_bias_relu_module(groups=8)).values())))
    _, conv = schedule_conv.find_conv(sch)
    assert conv.depthwise and conv.kernel == (3, 3) and conv.in_per_group == 1
    sch = tv.s_tir.Schedule(next(iter(conv_funcs(conv_bias_relu_module(groups=2)).values())))
    _, conv = schedule_conv.find_conv(sch)
    assert not conv.depthwise and conv.in_per_group == 4 and conv.out_channels == 8


def test_scheduled_convs_build_for_cuda_with_thread_bindings():
    model = torch.nn.Sequential(
        torch.nn.Conv2d(4, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 1, stride=2),
        torch.nn.Conv2d(8, 8, 3, padding=1, groups=8),
    )
    target = tv.make_target("cuda")
    mod = schedules.apply(lowered(model, torch.randn(1, 4, 16, 16)), target)
    convs = conv_funcs(mod)
    assert len(convs) == 3 and all("tirx.is_scheduled" in f.attrs for f in convs.values())
    mod = tv.run_passes(mod, [tv.gpu_default_schedule()], target)
    source = tv.source_of(tv.compile_module(mod, target))
    kernels = [k for k in source.split("__global__")[1:] if k.split("\n")[0].endswith("{")]
    assert len(kernels) == 3 and all("threadIdx.x" in k for k in kernels)
    assert "blockIdx.x" in source  # (a kernel whose grid is one block never names it)
    assert "__shared__" in source  # dense conv weights are staged in shared memory
    assert source.count("_intermediate_local") >= 3  # partial sums in registers


@pytest.mark.parametrize("shape", [(3, 24), (2, 5, 24)], ids=["2d", "batched"])
def test_scheduled_linear_matches_torch(shape):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(24, 40), torch.nn.ReLU())
    x = torch.randn(shape)
    scheduled = schedules.apply(lowered(model, x), LLVM)
    (func,) = [f for name, f in prim_funcs(scheduled).items() if "matmul" in name]
    assert "tirx.is_scheduled" in func.attrs and "T.vectorized" in func.script()
    np.testing.assert_allclose(
        run(scheduled, tv.make_target(LLVM), x).numpy(),
        model(x).detach().numpy(),
        rtol=1e-4,
        atol=1e-4,
    )


def test_scheduled_conv_and_linear_take_a_symbolic_batch():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(8 * 36, 5),
    ).eval()
    batch = torch.export.Dim("batch")
    with torch.no_grad():
        exported = torch.export.export(
            model, (torch.randn(2, 3, 6, 6),), dynamic_shapes=({0: batch},)
        )
    mod = tv.run_passes(
        tv.import_exported_program(exported), tv.legalize_and_fuse_passes(), tv.make_target(LLVM)
    )
    scheduled = schedules.apply(mod, LLVM)
    kernels = [f for n, f in prim_funcs(scheduled).items() if "conv" in n or "matmul" in n]
    assert len(kernels) == 2 and all("tirx.is_scheduled" in f.attrs for f in kernels)
    for size in (1, 3):
        x = torch.randn(size, 3, 6, 6)
        np.testing.assert_allclose(
            run(scheduled, tv.make_target(LLVM), x).numpy(),
            model(x).detach().numpy(),
            rtol=1e-4,
            atol=1e-4,
        )


def test_unrecognized_functions_are_left_as_they_were():
    model = torch.nn.Sequential(torch.nn.Softmax(-1), torch.nn.MaxPool2d(2))
    mod = lowered(model, torch.randn(1, 2, 8, 8))
    scheduled = schedules.apply(mod, LLVM)
    assert scheduled.same_as(mod)


def test_a_failing_schedule_leaves_the_function_unscheduled(monkeypatch):
    def broken(*args):
        raise RuntimeError("schedule bug")

    monkeypatch.setattr(schedule_conv, "schedule_cpu", broken)
    mod = conv_bias_relu_module()
    scheduled = schedules.apply(mod, LLVM)
    for name, func in prim_funcs(mod).items():
        tv.tvm.ir.assert_structural_equal(prim_funcs(scheduled)[name], func)
