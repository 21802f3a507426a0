"""Shrink a failing model spec block by block, after hypothesis has shrunk its draws.

Hypothesis shrinks the choices a spec was drawn from, which is thorough but slow when every
attempt exports a model. Knowing the spec's structure, a few targeted attempts go further
fast: drop a block, unwrap a residual, drop a branch or a concat part, drop an optional norm,
activation, scale or computed weight, halve channel counts and input sizes, use one attention
head, zero the weight seed, use a batch of 1. An attempt that makes no valid model does not
fail. Greedy: keep any simplification that still fails, until none does or time is up.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import replace

from .spec import Block, ModelSpec, Shape

OPTIONAL = ("pre_bn", "bn", "act", "scale", "weight_fn")  # a block's optional extras


def simpler_blocks(block: Block) -> Iterator[Block]:
    """`block` with one thing fewer, simplest changes first."""
    for key in OPTIONAL:
        if block[key]:
            yield Block(block.kind, {**block.params, key: None}, block.body)
    for key, smaller in (("out", block["out"] and block["out"] // 2), ("heads", 1)):
        if block[key] and block[key] > 1 and smaller:
            yield Block(block.kind, {**block.params, key: smaller}, block.body)
    if block.kind == "residual":
        for body in simpler_sequences(block.body, keep_one=True):
            yield Block("residual", block.params, body)
    for key in ("items", "parts"):
        values = block[key]
        if values and len(values) > 2 and block["variant"] != "split":
            for i in range(len(values)):
                yield Block(block.kind, {**block.params, key: values[:i] + values[i + 1 :]})
    for i, item in enumerate(block["items"] or ()):
        for extra in ("bn", "scale"):
            if item.get(extra) and item["kind"] != "bn":
                items = (*block["items"][:i], {**item, extra: None}, *block["items"][i + 1 :])
                yield Block(block.kind, {**block.params, "items": items})


def simpler_sequences(blocks: tuple[Block, ...], keep_one: bool) -> Iterator[tuple[Block, ...]]:
    """`blocks` with one block dropped, a residual unwrapped, or one block simplified."""
    for i in range(len(blocks)):
        if len(blocks) > 1 or not keep_one:
            yield blocks[:i] + blocks[i + 1 :]
    for i, block in enumerate(blocks):
        if block.kind == "residual":
            yield blocks[:i] + block.body + blocks[i + 1 :]
        for simpler in simpler_blocks(block):
            yield blocks[:i] + (simpler,) + blocks[i + 1 :]


def smaller_inputs(shape: Shape) -> Iterator[Shape]:
    if shape.channels > 1:
        yield replace(shape, channels=shape.channels // 2)
    if shape.sizes and max(shape.sizes) > 1:
        yield replace(shape, sizes=tuple((size + 1) // 2 for size in shape.sizes))


def candidates(spec: ModelSpec, inputs) -> Iterator[tuple[ModelSpec, object]]:
    for blocks in simpler_sequences(spec.blocks, keep_one=True):
        yield spec.with_blocks(blocks), inputs
    for shape in smaller_inputs(spec.input) if hasattr(inputs, "resized") else ():
        yield replace(spec, input=shape), inputs.resized(shape.per_example)
    if spec.seed:
        yield replace(spec, seed=0), inputs
    if hasattr(inputs, "with_batch") and inputs.shapes[0][0] > 1:
        yield spec, inputs.with_batch(1)


def minimize(
    spec: ModelSpec, inputs, fails: Callable[[ModelSpec, object], object], seconds: float
) -> tuple[ModelSpec, object]:
    """The smallest (spec, inputs) reached greedily for which `fails` is still truthy."""
    deadline = time.perf_counter() + seconds
    improved = True
    while improved:
        improved = False
        for candidate, candidate_inputs in candidates(spec, inputs):
            if time.perf_counter() > deadline:
                return spec, inputs
            if fails(candidate, candidate_inputs):
                spec, inputs, improved = candidate, candidate_inputs, True
                break
    return spec, inputs
