import torch
from torch import nn

from fxopt.checkpoint import checkpoint, restore, written_in_place
from fxopt.ir.graph import constant
from fxopt.passes.fold_conv_bn import fold_conv_bn
from fxopt.testing import count_ops, graph_of

aten = torch.ops.aten


def conv_bn() -> nn.Module:
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    net[1].running_mean.normal_()
    return net


def state(gm) -> dict:
    return {**dict(gm.named_parameters()), **dict(gm.named_buffers())}


def test_restore_puts_back_the_graph_and_the_tensors_a_pass_replaced():
    x = torch.randn(2, 3, 8, 8)
    gm = graph_of(conv_bn(), x)
    code, tensors, expected = gm.code, state(gm), gm(x)
    saved = checkpoint(gm)
    result = fold_conv_bn(gm)  # adds folded constants, drops the norm's and the conv's own
    assert result.modified and state(gm).keys() != tensors.keys()
    restored = restore(gm, saved)
    assert restored is gm and gm.code == code
    assert count_ops(gm, aten.batch_norm) == 1
    assert state(gm).keys() == tensors.keys()
    assert all(state(gm)[k] is t for k, t in tensors.items())
    torch.testing.assert_close(gm(x), expected, rtol=0, atol=0)
    assert written_in_place(saved) == []


def test_written_in_place_names_the_constants_a_pass_wrote():
    gm = graph_of(conv_bn(), torch.randn(2, 3, 8, 8))
    saved = checkpoint(gm)
    conv = next(n for n in gm.graph.nodes if n.target is aten.conv2d.default)
    with torch.no_grad():
        constant(gm, conv.args[1]).add_(1)
    assert written_in_place(saved) == [conv.args[1].target]
