"""Draw `FuzzSpec`s for `fxopt.testing.fuzz`: idioms one at a time, each valid for the state
(image or tokens, channel count) it receives; and simpler variants of a failing spec.
Choices are listed simplest first, which is where hypothesis shrinks them to."""

from __future__ import annotations

from collections.abc import Iterator

from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument

from .fuzz_models import EMITTERS, KNOWN_BUGS, SWITCHES, FuzzSpec, Part, render
from .idioms import ACTIVATIONS, IN_PLACE, VIEWS, Context, State
from .idioms_arguments import FILLS
from .layers import Writer

# kind -> modes it applies to; simplest first, which is where hypothesis shrinks to
KINDS = {
    "conv": ("spatial",),
    "mlp": ("spatial", "tokens"),
    "views": ("spatial", "tokens"),
    "inplace": ("spatial", "tokens"),
    "repvgg": ("spatial",),
    "to_tokens": ("spatial",),
    "to_spatial": ("tokens",),
    "attention": ("tokens",),
    "masked_fill": ("spatial", "tokens"),
    "scalar": ("spatial", "tokens"),
    "data_branch": ("spatial", "tokens"),
    "shared": ("spatial", "tokens"),
    "tied": ("spatial", "tokens"),
    "normalize": ("spatial", "tokens"),
    "counter": ("spatial", "tokens"),
}
WEIGHTS = {"conv": 2, "repvgg": 3, "attention": 4, "inplace": 2, "masked_fill": 2}  # the rest: once
OUTPUTS = ("tensor", "tuple", "list", "dict", "nested")
SIMPLEST = {  # spec field -> its simplest value
    "outputs": "tensor",
    "omit_defaults": False,
    "mask_given": False,
    "batch": 1,
    "scale": 2,
    "flag": True,
    "seed": 0,
    "input_seed": 0,
    "train_mode": False,
}


def simpler_specs(spec: FuzzSpec) -> Iterator[FuzzSpec]:
    """`spec` with one thing fewer or simpler, biggest cuts first; some are not valid models
    (a token idiom left without the part that made tokens), which the caller skips."""
    parts = spec.parts
    for i in range(len(parts) if len(parts) > 1 else 0):
        yield _replace(spec, parts=parts[:i] + parts[i + 1 :])
    for i, part in enumerate(parts):
        for simpler in simpler_parts(part):
            yield _replace(spec, parts=parts[:i] + (simpler,) + parts[i + 1 :])
    for key, value in SIMPLEST.items():
        if getattr(spec, key) != value:
            yield _replace(spec, **{key: value})


def simpler_parts(part: Part) -> Iterator[Part]:
    if part.tap:
        yield Part(part.kind, part.params)
    for key, value in part.params.items():
        if value is True or (key in ("act", "norm") and value):
            yield Part(part.kind, {**part.params, key: False if value is True else None}, part.tap)
        elif key in ("groups", "heads") and value != 1:
            yield Part(part.kind, {**part.params, key: 1}, part.tap)
        elif isinstance(value, tuple) and len(value) > 1:
            for j in range(len(value)):
                params = {**part.params, key: value[:j] + value[j + 1 :]}
                yield Part(part.kind, params, part.tap)


def check_kinds(kinds, known_bugs) -> tuple[frozenset[str], frozenset[str]]:
    """The idiom kinds and the switches drawn: every switch not in `KNOWN_BUGS`, and those
    of it that `known_bugs` names."""
    chosen = kinds is not None
    kinds = frozenset(KINDS if kinds is None else kinds) - {"counter"}
    unknown = (kinds - set(KINDS)) | (frozenset(known_bugs) - set(KNOWN_BUGS))
    if unknown:
        raise InvalidArgument(f"unknown idioms or known bugs {sorted(unknown)}")
    switches = (frozenset(SWITCHES) - frozenset(KNOWN_BUGS)) | frozenset(known_bugs)
    if "buffer_writes" in switches and (not chosen or "buffer_writes" in known_bugs):
        kinds |= {"counter"}  # the buffer-write idiom, unless the caller chose the kinds
    return kinds, switches


@st.composite
def fuzz_specs(draw, kinds=None, known_bugs=(), depth: int = 4) -> FuzzSpec:
    """Random model specs built from `kinds` (default: every kind in `KINDS`) and the idioms of
    every switch not in `KNOWN_BUGS`, and of those in `known_bugs`."""
    kinds, bugs = check_kinds(kinds, known_bugs)
    mode = draw(st.sampled_from(["spatial", "tokens"]))
    channels, height, width = (
        draw(st.integers(2, 8)),
        draw(st.integers(2, 4)),
        draw(st.integers(2, 4)),
    )
    state, parts = State(mode, channels), []
    for _ in range(draw(st.integers(1, depth))):
        allowed = [k for k in KINDS if k in kinds and state.mode in KINDS[k]]
        allowed = [k for k in allowed for _ in range(WEIGHTS.get(k, 1))]
        if not allowed:
            break
        kind = draw(st.sampled_from(allowed))
        part = Part(kind, draw(PARAMS[kind](state)), draw(st.booleans()))
        parts.append(part)
        state = EMITTERS[kind](Writer(), Context(height, width), "p", part.params, state)
    spec = FuzzSpec(
        mode,
        channels,
        height,
        width,
        tuple(parts),
        outputs=draw(st.sampled_from(OUTPUTS)),
        mask=draw(st.sampled_from(["bool", "additive"])),
        mask_given=draw(st.booleans()),
        scale=draw(st.integers(1 if "output_copies_input" in bugs else 2, 3)),
        flag=draw(st.booleans()),
        omit_defaults=draw(st.booleans()),
        input_copy="output_copies_input" in bugs and draw(st.booleans()),
        fully_masked="fully_masked_rows" in bugs and draw(st.booleans()),
        extreme_mask="extreme_additive_masks" in bugs and draw(st.booleans()),
        seed=draw(st.integers(0, 1 << 16)),
        input_seed=draw(st.integers(0, 1 << 16)),
        train_mode=draw(st.booleans()),
    )
    _, ctx = render(spec)
    bool_mask = "mask" in ctx.arguments and spec.mask == "bool" and spec.mask_given
    largest = 1 if bool_mask and "batched_bool_masks" not in bugs else 3
    return _replace(spec, batch=draw(st.integers(1, largest)))


def _replace(spec: FuzzSpec, **changes) -> FuzzSpec:
    return FuzzSpec(**{**vars(spec), **changes})


ACT = st.sampled_from([None, *ACTIVATIONS])
WIDTH = st.integers(2, 8)


def _conv(s: State):
    return st.fixed_dictionaries({"depthwise": st.booleans()}).flatmap(
        lambda d: st.fixed_dictionaries(
            {
                "out": st.just(s.channels) if d["depthwise"] else WIDTH,
                "k": st.sampled_from([1, 3]),
                "depthwise": st.just(d["depthwise"]),
                "bn": st.booleans(),
                "act": ACT,
                "bias": st.booleans(),
                "tap_conv": st.booleans(),
                "pre_bn": st.booleans(),
            }
        )
    )


def _repvgg(s: State):
    def groups(out: int) -> list[int]:
        return (
            [1]
            + ([2] if s.channels % 2 == out % 2 == 0 else [])
            + ([s.channels] if out == s.channels > 2 else [])
        )

    return st.sampled_from([s.channels, 2, 4, 8]).flatmap(
        lambda out: st.fixed_dictionaries(
            {
                "out": st.just(out),
                "groups": st.sampled_from(groups(out)),
                "inplace": st.booleans(),
            }
        )
    )


def _views(s: State):
    templates = [t for t in VIEWS[s.mode] if s.channels % 2 == 0 or t not in ODD_VIEWS]
    return st.fixed_dictionaries(
        {"templates": st.lists(st.sampled_from(templates), min_size=1, max_size=2).map(tuple)}
    )


def _attention(s: State):
    return st.fixed_dictionaries(
        {
            "heads": st.sampled_from([1, 2] if s.channels % 2 == 0 else [1]),
            "fused": st.booleans(),
            "sdpa": st.booleans(),
            "mask": st.sampled_from(["none", "arg", "arg", "causal"]),
            "fill": st.sampled_from(list(FILLS)),
        }
    )


def _tied(s: State):
    return st.booleans().flatmap(
        lambda transposed: st.fixed_dictionaries(
            {
                "transposed": st.just(transposed),
                "hidden": WIDTH if transposed else st.just(s.channels),
            }
        )
    )


ODD_VIEWS = ("channel_shuffle", "heads")  # need an even channel count
PARAMS = {
    "conv": _conv,
    "repvgg": _repvgg,
    "mlp": lambda s: st.fixed_dictionaries(
        {
            "hidden": st.sampled_from([s.channels, 2 * s.channels]),
            "norm": st.sampled_from([None, "layer", "batch"]),
            "act": ACT,
            "inplace": st.booleans(),
        }
    ),
    "inplace": lambda s: st.fixed_dictionaries(
        {
            "out": st.sampled_from([s.channels, 2, 8]),
            "ops": st.lists(st.sampled_from(list(IN_PLACE)), min_size=1, max_size=3).map(tuple),
        }
    ),
    "views": _views,
    "to_tokens": lambda s: st.fixed_dictionaries({"flatten": st.booleans()}),
    "to_spatial": lambda s: st.fixed_dictionaries({"view": st.booleans()}),
    "attention": _attention,
    "masked_fill": lambda s: st.fixed_dictionaries({"fill": st.booleans()}),
    "scalar": lambda s: st.sampled_from(
        [
            {"scale": True, "flag": False},
            {"scale": False, "flag": True},
            {"scale": True, "flag": True},
        ]
    ),
    "data_branch": lambda s: st.fixed_dictionaries({"threshold": st.sampled_from([0.0, -1e9])}),
    "shared": lambda s: st.fixed_dictionaries({"nested": st.booleans()}),
    "tied": _tied,
    "normalize": lambda s: st.fixed_dictionaries(
        {"persistent": st.booleans(), "seed": st.integers(0, 1 << 16)}
    ),
    "counter": lambda s: st.fixed_dictionaries({"running_mean": st.booleans()}),
}
