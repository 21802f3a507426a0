import copy

import pytest
import torch
from torch import nn

import fxopt
from fxopt.ir.errors import InputError


def conv_bn_net() -> nn.Module:
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Dropout(0.2),
        nn.Conv2d(8, 4, 1),
    )
    model[1].running_mean.normal_()
    model[1].running_var.uniform_(0.5, 2.0)
    return model.eval()


def snapshot(model: nn.Module):
    return copy.deepcopy(model.state_dict()), model.training


def assert_unchanged(model: nn.Module, before) -> None:
    state, training = before
    assert model.training == training
    after = model.state_dict()
    assert state.keys() == after.keys()
    for key, value in state.items():
        assert torch.equal(after[key], value), key


def test_optimize_folds_and_matches_eager_at_another_batch_size():
    model, x = conv_bn_net(), torch.randn(1, 3, 16, 16)
    opt = fxopt.optimize(model, x)
    assert opt.report.dynamic_batch
    assert "batch_norm" not in opt.report.after.op_counts
    assert "dropout" not in opt.report.after.op_counts
    x5 = torch.randn(5, 3, 16, 16)
    fxopt.testing.assert_equivalent(model, opt, (x5,))


def test_report_lists_passes_counts_and_renders_as_text_and_dict():
    opt = fxopt.optimize(conv_bn_net(), torch.randn(2, 3, 8, 8))
    record = {p.name: p for p in opt.report.passes}["fold_conv_bn"]
    assert record.status == "applied" and record.applied == {"conv-bn": 1}
    assert record.max_error is not None
    assert opt.report.before.params > opt.report.after.params
    assert opt.report.before.flops > opt.report.after.flops
    text = str(opt.report)
    assert "fold_conv_bn" in text and "aten.batch_norm" in text
    data = opt.report.to_dict()
    assert data["after"]["op_counts"]["conv2d"] == 2


def test_tuple_list_and_dict_outputs_keep_their_structure():
    class Outputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = conv_bn_net()

        def forward(self, x):
            y = self.net(x)
            return {"y": y, "parts": [y.mean(), (y.sum(), y.amax())]}

    model, x = Outputs().eval(), torch.randn(2, 3, 8, 8)
    out = fxopt.optimize(model, x)(x)
    assert isinstance(out, dict) and isinstance(out["parts"], list)
    assert isinstance(out["parts"][1], tuple)
    fxopt.testing.assert_equivalent(model, fxopt.optimize(model, x), (x,))


def test_model_in_training_mode_is_optimized_in_eval_mode_and_left_in_training_mode():
    model = conv_bn_net().train()
    before = snapshot(model)
    x = torch.randn(2, 3, 8, 8)
    with pytest.warns(UserWarning, match="training mode"):
        opt = fxopt.optimize(model, x)
    assert_unchanged(model, before)
    assert any("training mode" in note for note in opt.report.notes)
    fxopt.testing.assert_equivalent(copy.deepcopy(model).eval(), opt, (x,))


def test_caller_model_is_unchanged():
    model = conv_bn_net()
    before = snapshot(model)
    fxopt.optimize(model, torch.randn(2, 3, 8, 8))
    assert_unchanged(model, before)


def test_inputs_that_do_not_match_forward_raise_input_error():
    model = conv_bn_net()
    before = snapshot(model)
    with pytest.raises(InputError, match="do not match"):
        fxopt.optimize(model, (torch.randn(1, 3, 8, 8), torch.randn(1)))
    assert_unchanged(model, before)


def test_non_tensor_inputs_raise_input_error():
    with pytest.raises(InputError, match="not object"):
        fxopt.optimize(conv_bn_net(), (object(),))


def test_nested_inputs_are_supported():
    class Pair(nn.Module):
        def forward(self, pair, scale: float):
            return pair["a"] * scale + pair["b"]

    model, args = Pair(), ({"a": torch.randn(2, 3), "b": torch.randn(2, 3)}, 2.0)
    opt = fxopt.optimize(model, args)
    torch.testing.assert_close(opt(*args), model(*args))


def test_nan_weights_raise_input_error_naming_the_tensor():
    model = conv_bn_net()
    with torch.no_grad():
        model[0].weight[0, 0, 0, 0] = float("nan")
    before = snapshot(model)
    with pytest.raises(InputError, match=r"0\.weight holds NaN"):
        fxopt.optimize(model, torch.randn(1, 3, 8, 8))
    state, _ = before
    assert torch.isnan(model[0].weight).any() and state.keys() == model.state_dict().keys()


def test_batch_norm_without_running_stats_is_kept_and_results_match():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False)).eval()
    x = torch.randn(3, 3, 8, 8)
    opt = fxopt.optimize(model, x)
    assert opt.report.after.op_counts.get("batch_norm") == 1
    fxopt.testing.assert_equivalent(model, opt, (x,))


def test_empty_model_optimizes_to_identity():
    model, x = nn.Sequential(), torch.randn(2, 3)
    opt = fxopt.optimize(model, x)
    torch.testing.assert_close(opt(x), x)
    assert opt.report.after.op_counts == {}


def test_module_without_forward_raises_input_error():
    with pytest.raises(InputError, match="no forward"):
        fxopt.optimize(nn.Module(), torch.randn(1))


def test_meta_device_model_raises_input_error():
    with torch.device("meta"):
        model = nn.Linear(3, 3)
    with pytest.raises(InputError, match="meta device"):
        fxopt.optimize(model, torch.randn(1, 3))


@pytest.mark.tvm
def test_tvm_backend_runs_the_graph_in_tvm_and_matches_eager():
    model, x = conv_bn_net(), torch.randn(1, 3, 8, 8)
    before = snapshot(model)
    opt = fxopt.optimize(model, x, backend="tvm")
    assert type(opt._runner).__name__ == "TVMModule"
    assert opt.report.final_error is not None
    assert any(note.startswith("tvm: built for llvm") for note in opt.report.notes)
    fxopt.testing.assert_equivalent(model, opt, x, n_random=1)
    fxopt.testing.assert_equivalent(model, opt, torch.randn(3, 3, 8, 8))
    assert_unchanged(model, before)
    with pytest.raises(InputError, match="target= applies to backend='tvm' only"):
        fxopt.optimize(model, x, target="llvm")


def test_unknown_backend_and_unknown_pass_raise_input_error():
    with pytest.raises(InputError, match="unknown backend"):
        fxopt.optimize(conv_bn_net(), torch.randn(1, 3, 8, 8), backend="tensorrt")
    with pytest.raises(InputError, match="unknown pass"):
        fxopt.optimize(conv_bn_net(), torch.randn(1, 3, 8, 8), passes=["fold_everything"])


def test_model_that_fixes_the_batch_size_falls_back_to_static_and_says_so():
    class FixedBatch(nn.Module):
        def forward(self, x):
            return x.reshape(2, 6).relu()  # reshape(2, -1) would work at any batch

    opt = fxopt.optimize(FixedBatch(), torch.randn(2, 6))
    assert not opt.report.dynamic_batch
    assert any("static batch" in note for note in opt.report.notes)


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = conv_bn_net()

    def forward(self, x):
        y = self.net(x)
        if y.sum() > 0:  # data-dependent control flow: torch.export cannot capture this
            return y * 2
        return -y


def test_data_dependent_control_flow_falls_back_to_dynamo_and_reports_the_break():
    model = DataDependent().eval()
    before = snapshot(model)
    x = torch.randn(1, 3, 8, 8)
    opt = fxopt.optimize(model, x)
    assert opt.report.capture == "dynamo fallback"
    assert opt.report.graph_breaks
    assert {p.name: p for p in opt.report.passes}["fold_conv_bn"].applied == {"conv-bn": 1}
    for sample in (x, -x, torch.randn(1, 3, 8, 8)):
        torch.testing.assert_close(opt(sample), model(sample), rtol=1e-5, atol=1e-5)
    assert_unchanged(model, before)


def test_fxopt_is_a_registered_dynamo_backend():
    model, x = conv_bn_net(), torch.randn(2, 3, 8, 8)
    compiled = torch.compile(copy.deepcopy(model), backend="fxopt")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)


def test_calling_with_another_shape_than_optimized_for_raises_input_error():
    model = conv_bn_net()
    opt = fxopt.optimize(model, torch.randn(2, 3, 8, 8))
    opt(torch.randn(7, 3, 8, 8))  # the batch is free
    with pytest.raises(InputError, match=r"shape \('B', 3, 8, 8\)"):
        opt(torch.randn(2, 3, 9, 9))
    with pytest.raises(InputError, match="float32"):
        opt(torch.randn(2, 3, 8, 8, dtype=torch.float64))


def test_static_batch_graph_rejects_another_batch_size():
    opt = fxopt.optimize(conv_bn_net(), torch.randn(2, 3, 8, 8), dynamic_batch=False)
    assert not opt.report.dynamic_batch
    with pytest.raises(InputError, match=r"shape \(2, 3, 8, 8\)"):
        opt(torch.randn(3, 3, 8, 8))
