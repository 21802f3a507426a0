"""Every near-miss of a built-in pass says why: no "can_fold returned False" in the report.

The rule protocol (`fxopt.rewrite`) lets a check return a bare False, which the report can
only show as "<check> returned False"; the built-in rules always `decline(reason)` instead.
This runs the default pipeline (and, on two models, the approximate passes too) on zoo models
that the explain report is read on, and checks every near-miss it lists.
"""

import re

import pytest

import fxopt
from fxopt import models

GENERIC = re.compile(r"returned (False|None)$|the rule has no build or replacement$")
MODELS = [
    "repvgg_a0_like",
    "vit_deit_like",
    "resnet18_like",
    "mobileone_s0_like",
    "mobilenetv2_like",
    "inceptionnext_atto_like",
    "repmlp_net",
    "fsrcnn_like",
    "vit_bn_like",
    "token_softmax_attention",
    "linear_attention_vit",
    "vit_adapter_net",
]


def near_misses(name: str, approximate: bool) -> list[str]:
    model = models.create(name)
    optimized = fxopt.optimize(model, models.example_inputs(name), approximate=approximate)
    return [
        f"{record.name}/{rule}: {reason}"
        for record in optimized.report.passes
        for rule, reasons in record.declined.items()
        for reason in reasons
    ]


@pytest.mark.parametrize("name", MODELS)
def test_every_near_miss_of_the_default_pipeline_gives_a_reason(name):
    found = near_misses(name, approximate=False)
    assert found, "the model should have near-misses to check"
    assert [reason for reason in found if GENERIC.search(reason)] == []


@pytest.mark.parametrize("name", ["vit_deit_like", "replknet_like"])
def test_every_near_miss_of_the_approximate_passes_gives_a_reason(name):
    found = near_misses(name, approximate=True)
    assert [reason for reason in found if GENERIC.search(reason)] == []
