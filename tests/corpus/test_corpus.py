"""The corpus: `fxopt.optimize` with its defaults on real timm, torchvision and Hugging Face
models (random weights), each in its own process. Run it with `make corpus`.

Per model: the run ends "ok" (optimize raised nothing, the result matches eager at the example
batch and at batch 3, the caller's model is untouched), no pass was rolled back, and at most
`Expect.bn` batch norms are left. For the re-parameterization families (`deploy=True`) fxopt,
given only the train form, must also end with no more batch norms, convs and linears than
timm's own hand-written deploy form (`reparameterize_model`) has.

The bounds say what each model should reach, not what it reaches today: a bound above zero
carries the reason those batch norms cannot fold, and a model that falls short today for a known
reason says so in `known_gap` (a strict xfail: it turns into a failure once the model passes).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

pytestmark = pytest.mark.corpus


@dataclass(frozen=True)
class Expect:
    bn: int = 0  # batch norms left after optimize, at most
    deploy: bool = False  # a re-param family: reach timm's deploy form's BN/conv/linear counts
    why: str = ""  # why `bn` cannot be lower
    # a product gap known today: the test is a strict xfail with this reason, so it fails
    # (and the entry must go) the day the model passes
    known_gap: str = ""


REPARAM = Expect(deploy=True)
# Pre-activation BN -> ReLU -> conv on a concat or pool output that other layers read too:
# no conv of its own in front to fold into, a ReLU behind it.
PRE_ACTIVATION = "BN -> ReLU on a shared concat/pool output: nothing to fold into either way"
# XCiT's local patch interaction: conv -> GELU -> BN -> 3x3 depthwise conv with zero padding.
GELU_THEN_PADDED_CONV = "BN between a GELU and a zero-padded conv: the padding breaks the fold"

EXPECTED = {
    # re-parameterization families: timm's reparameterize_model is the reference
    "timm:repvgg_a0": REPARAM,
    "timm:repvgg_b1g4": REPARAM,
    "timm:mobileone_s0": REPARAM,
    "timm:mobileone_s1": REPARAM,
    "timm:mobileone_s4": REPARAM,
    "timm:fastvit_t8": REPARAM,
    "timm:fastvit_sa12": REPARAM,
    "timm:repghostnet_050": REPARAM,
    "timm:repvit_m0_9": REPARAM,
    "timm:levit_128s": REPARAM,
    "timm:efficientvit_m0": REPARAM,
    "timm:tiny_vit_5m_224": REPARAM,
    # timm: conv -> BN (or BN -> 1x1 conv / linear) everywhere, unless a reason says otherwise
    "timm:inception_next_atto": Expect(),
    "timm:starnet_s050": Expect(),  # the last BN -> global pool -> head linear folds too
    "timm:ghostnetv2_100": Expect(),
    "timm:ghostnet_100": Expect(),
    "timm:resnet18": Expect(),
    "timm:resnet50": Expect(),
    "timm:convnext_atto": Expect(),
    "timm:efficientnet_b0": Expect(),
    "timm:mobilenetv3_small_050": Expect(),
    "timm:mobilenetv4_conv_small": Expect(),
    "timm:regnetx_002": Expect(),
    "timm:vit_tiny_patch16_224": Expect(),
    "timm:deit_tiny_patch16_224": Expect(),
    "timm:swin_tiny_patch4_window7_224": Expect(),
    "timm:maxvit_nano_rw_256": Expect(),
    "timm:tresnet_m": Expect(),
    "timm:gcvit_xxtiny": Expect(),
    "timm:davit_tiny": Expect(),
    "timm:cait_xxs24_224": Expect(),
    "timm:coat_lite_tiny": Expect(),
    "timm:poolformer_s12": Expect(),
    "timm:edgenext_xx_small": Expect(),
    "timm:mobilevit_xxs": Expect(),
    "timm:densenet121": Expect(62, why=PRE_ACTIVATION),
    "timm:dla34": Expect(),
    "timm:hrnet_w18_small": Expect(),
    "timm:rexnet_100": Expect(),
    "timm:dpn68": Expect(27, why=PRE_ACTIVATION),
    "timm:mixnet_s": Expect(),  # BN after a cat of convs: each channel has one conv
    "timm:lcnet_050": Expect(),
    "timm:efficientformer_l1": Expect(),
    "timm:efficientformerv2_s0": Expect(),  # likewise its BN -> spatial mean -> heads
    "timm:xcit_nano_12_p16_224": Expect(12, why=GELU_THEN_PADDED_CONV),
    "timm:resmlp_12_224": Expect(),
    # torchvision
    "torchvision:resnet18": Expect(),
    "torchvision:resnet50": Expect(),
    "torchvision:mobilenet_v2": Expect(),
    "torchvision:mobilenet_v3_small": Expect(),
    "torchvision:efficientnet_b0": Expect(),
    "torchvision:regnet_x_400mf": Expect(),
    "torchvision:convnext_tiny": Expect(),
    "torchvision:swin_t": Expect(),
    "torchvision:shufflenet_v2_x0_5": Expect(),
    "torchvision:squeezenet1_0": Expect(),
    "torchvision:densenet121": Expect(62, why=PRE_ACTIVATION),
    "torchvision:googlenet": Expect(),
    # Hugging Face transformers (small configs, no batch norm)
    "hf:bert": Expect(),
    "hf:distilbert": Expect(),
    "hf:gpt2": Expect(),
    "hf:llama": Expect(),
    "hf:t5_encoder": Expect(),
    "hf:vit": Expect(),
    "hf:clip_vision": Expect(),
    "hf:whisper_encoder": Expect(),
}


def failures(row: dict, expect: Expect) -> list[str]:
    """Everything that falls short of the expectation, one line each."""
    if row["status"] != "ok":
        return [row["status"]]
    found = []
    if row["rolled_back"]:
        found.append(f"rolled back: {row['rolled_back']}: {row['rollback_messages']}")
    if row["after"]["bn"] > expect.bn:
        reason = f" ({expect.why})" if expect.why else ""
        found.append(f"{row['after']['bn']} batch norms left, expected at most {expect.bn}{reason}")
    if expect.deploy:
        for key in ("bn", "conv", "linear"):
            if row["after"][key] > row["deploy"][key]:
                found.append(
                    f"{key}: {row['after'][key]} after optimize, timm's deploy form has "
                    f"{row['deploy'][key]}"
                )
    return found


def test_every_bound_above_zero_says_why():
    assert [name for name, expect in EXPECTED.items() if expect.bn and not expect.why] == []


def cases() -> list:
    return [
        pytest.param(
            name,
            expect,
            id=name,
            marks=[pytest.mark.xfail(strict=True, reason=expect.known_gap)]
            if expect.known_gap
            else [],
        )
        for name, expect in EXPECTED.items()
    ]


@pytest.mark.parametrize(("name", "expect"), cases())
def test_optimize_is_exact_leaves_the_model_untouched_and_folds_what_it_should(
    name, expect, corpus
):
    row = corpus.row(name)
    assert row.get("eager_finite", True), f"{name}: harness: the eager output is not finite"
    found = failures(row, expect)
    assert not found, f"{name}: " + "; ".join(found)
