"""Model specs: random test models as plain data, so hypothesis can shrink them and a failing
one can be printed as PyTorch source.

A spec is an input shape, a tuple of blocks and a weight seed. A block is a kind (`conv`,
`branches`, `attention`, ...) with its hyper-parameters; `residual` blocks hold a body of
blocks. `output_shape` is the one place that knows how each block changes the tensor's shape:
the strategies use it to draw valid blocks, the source writer to size the layers.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

MAX_CHANNELS = 8
MAX_SIZE = {1: 12, 2: 12, 3: 6}  # spatial size per dimensionality


@dataclass(frozen=True)
class Shape:
    """The per-example shape a block sees (the batch dimension is left out).

    `mode` is "spatial" (channels, *sizes), "tokens" (sequence, features: sizes = (N,)) or
    "flat" (features only).
    """

    mode: str
    channels: int
    sizes: tuple[int, ...] = ()

    @property
    def dims(self) -> int:
        return len(self.sizes) if self.mode == "spatial" else 0

    @property
    def per_example(self) -> tuple[int, ...]:
        if self.mode == "tokens":
            return (self.sizes[0], self.channels)
        return (self.channels, *self.sizes)


@dataclass(frozen=True)
class Block:
    """One building block: `kind`, its hyper-parameters, and a body for `residual`."""

    kind: str
    params: dict[str, Any] = field(default_factory=dict)
    body: tuple[Block, ...] = ()

    def __getitem__(self, name: str) -> Any:
        return self.params.get(name)

    def __repr__(self) -> str:
        args = [f"{key}={value!r}" for key, value in self.params.items()]
        if self.body:
            args.append(f"body={list(self.body)!r}")
        return f"{self.kind}({', '.join(args)})"


@dataclass(frozen=True)
class ModelSpec:
    """A whole model: the input shape, the blocks in order, and the seed of every weight."""

    input: Shape
    blocks: tuple[Block, ...]
    seed: int = 0

    def __repr__(self) -> str:
        blocks = ", ".join(repr(b) for b in self.blocks)
        return f"ModelSpec({self.input.mode}{self.input.per_example}, [{blocks}], seed={self.seed})"

    def _repr_pretty_(self, printer, cycle) -> None:  # hypothesis prints examples with this
        printer.text(repr(self))

    @property
    def output(self) -> Shape:
        shape = self.input
        for block in self.blocks:
            shape = output_shape(block, shape)
        return shape

    def count_blocks(self) -> int:
        """Blocks at every level (a residual counts itself and its body)."""
        return _count(self.blocks)

    def with_blocks(self, blocks: tuple[Block, ...]) -> ModelSpec:
        return replace(self, blocks=blocks)


def _count(blocks: tuple[Block, ...]) -> int:
    return sum(1 + _count(b.body) for b in blocks)


def conv_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    """Output length of a convolution or pooling along one axis."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def transposed_size(
    size: int, kernel: int, stride: int, padding: int, dilation: int, output_padding: int
) -> int:
    """Output length of a transposed convolution along one axis."""
    return (size - 1) * stride - 2 * padding + dilation * (kernel - 1) + output_padding + 1


def centred_padding(kernel: int, dilation: int = 1) -> int:
    """The padding that keeps an odd kernel centred: every branch then has the same size."""
    return dilation * (kernel - 1) // 2


def to_tokens(shape: Shape) -> Shape:
    """(C, *sizes) flattened to (prod(sizes), C)."""
    count = 1
    for size in shape.sizes:
        count *= size
    return Shape("tokens", shape.channels, (count,))


def linear_input(block: Block, shape: Shape) -> Shape:
    """What a linear block's layer reads: spatial inputs become tokens or are averaged."""
    if shape.mode != "spatial":
        return shape
    return to_tokens(shape) if block["to"] == "tokens" else Shape("flat", shape.channels)


def output_shape(block: Block, shape: Shape) -> Shape:
    """The shape after `block`, given the shape before it."""
    kind = block.kind
    if kind in ("bn", "act", "scale", "noop", "residual"):
        return shape
    if kind == "conv":
        return _conv_shape(block, shape)
    if kind in ("branches", "pool"):
        sizes = tuple((size - 1) // block["stride"] + 1 for size in shape.sizes)
        return Shape("spatial", block["out"] or shape.channels, sizes)
    if kind == "concat":
        sizes = tuple((size - 1) // block["stride"] + 1 for size in shape.sizes)
        return Shape("spatial", sum(part["out"] for part in block["parts"]), sizes)
    if kind in ("attention", "linear_attention"):
        return to_tokens(shape) if shape.mode == "spatial" else shape
    if kind == "linear":
        shape = linear_input(block, shape)
        return Shape(shape.mode, block["out"], shape.sizes)
    raise ValueError(f"unknown block kind {kind!r}")


def _conv_shape(block: Block, shape: Shape) -> Shape:
    sizes = []
    for axis, size in enumerate(shape.sizes):
        kernel, padding = block["k"][axis], block["pad"][axis]
        if block["variant"] == "transposed":
            sizes.append(
                transposed_size(
                    size, kernel, block["stride"], padding, block["dil"], block["out_pad"]
                )
            )
        else:
            sizes.append(conv_size(size, kernel, block["stride"], padding, block["dil"]))
    return Shape("spatial", block["out"], tuple(sizes))
