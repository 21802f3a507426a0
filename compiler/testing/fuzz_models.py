"""The models `fxopt.testing.fuzz` draws: a spec (plain data hypothesis shrinks; drawn by
`fxopt.testing.fuzz_draw`) made of the idioms in `fxopt.testing.idioms`, and the runnable
script it prints as. The model and its inputs are built by running that script, so a failure's
script reproduces it exactly.

Some idioms are switches (`SWITCHES`: each once met an fxopt bug). A switch whose bug is open
goes in `KNOWN_BUGS`: the default strategy leaves it out while the bug is being fixed, and
`known_bugs` draws it on demand.
"""

from __future__ import annotations

import inspect
import itertools
import linecache
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from . import idioms, idioms_arguments
from .idioms import Context, State
from .layers import Writer
from .source import HEADER, INIT_WEIGHTS, randomize_batch_norm

SWITCHES = {  # switch -> the idiom it adds, and the bug it met until it was fixed
    "vary_arguments": "fresh calls give int / bool arguments other values than the example's "
    "(optimize freezes non-tensor arguments at their example values)",
    "output_copies_input": "an output is a copy of an input (x.clone(), or x * scale called "
    "with scale=1): remove_noops drops the copy and the output aliases the input",
    "fully_masked_rows": "a mask hides every key of one row (fully masked attention rows)",
    "batched_bool_masks": "a bool mask argument with a batch larger than 1 (fresh inputs at "
    "another batch cannot be made from it: verify.random_like expands it)",
    "extreme_additive_masks": "additive masks of torch.finfo(float32).min, as Hugging Face "
    "writes them (verification's random inputs scale them past float32: the reference turns "
    "NaN and every pass is rolled back)",
    "buffer_writes": "the forward writes a buffer (a counter, a running mean): verification "
    "runs the copy many times, so its state moves and the final check fails",
}
# The switches whose bugs are open: the default strategy leaves their idioms out, `known_bugs`
# names them to draw them. Every switch above is fixed and drawn by default.
KNOWN_BUGS: dict[str, str] = {}
EMITTERS = {**idioms.EMITTERS, **idioms_arguments.EMITTERS}  # kind -> its writer
DEFAULTS = {"mask": None, "scale": 2, "flag": True}  # the forward's arguments after x
SIGNATURE = {"mask": "mask=None", "scale": "scale: int = 2", "flag": "flag: bool = True"}


@dataclass(frozen=True)
class Part:
    """One idiom: its kind, its parameters, and whether its result is also an output."""

    kind: str
    params: dict = field(default_factory=dict)
    tap: bool = False

    def __repr__(self) -> str:
        args = [f"{k}={v!r}" for k, v in self.params.items()] + (["tap"] if self.tap else [])
        return f"{self.kind}({', '.join(args)})"


@dataclass(frozen=True)
class FuzzSpec:
    """A whole model and its example call. `mask` is the mask argument's kind ("bool" or
    "additive"), used only if a part reads it; `mask_given`: the example passes a tensor, not
    None; `scale` and `flag` are the example's values; `omit_defaults`: trailing arguments at
    their default are left out of the example."""

    mode: str
    channels: int
    height: int
    width: int
    parts: tuple[Part, ...]
    outputs: str = "tensor"
    mask: str = "bool"
    mask_given: bool = True
    scale: int = 2
    flag: bool = True
    omit_defaults: bool = False
    input_copy: bool = False  # known bug: return x.clone() of the input too
    fully_masked: bool = False  # known bug: the mask hides a whole row
    extreme_mask: bool = False  # known bug: additive masks of finfo.min, not -1e4
    batch: int = 1
    seed: int = 0
    input_seed: int = 0
    train_mode: bool = False  # the caller's model is in training mode (fxopt optimizes eval)

    def __repr__(self) -> str:
        fields = [f"{k}={v!r}" for k, v in vars(self).items() if k not in ("parts", "mode")]
        parts = ", ".join(repr(p) for p in self.parts)
        return f"FuzzSpec({self.mode}, [{parts}], {', '.join(fields)})"

    def _repr_pretty_(self, printer, cycle) -> None:  # hypothesis prints examples with this
        printer.text(repr(self))


def render(spec: FuzzSpec) -> tuple[Writer, Context]:
    """The model's `__init__` and `forward` lines, and what they used."""
    w, ctx = Writer(), Context(spec.height, spec.width, spec.mask)
    state = State(spec.mode, spec.channels)
    for i, part in enumerate(spec.parts):
        state = EMITTERS[part.kind](w, ctx, f"p{i}", part.params, state)
        if part.tap:
            w.line(f"t{len(ctx.taps)} = x")
            ctx.taps.append(f"t{len(ctx.taps)}")
    w.line(output_statement(spec, ctx))
    ctx.idioms |= call_idioms(spec, ctx)
    return w, ctx


def call_idioms(spec: FuzzSpec, ctx: Context) -> set[str]:
    """Coverage labels of the output structure and of how the example passes arguments."""
    found = set()
    if spec.outputs != "tensor" or spec.input_copy:
        found.add(f"{'tuple' if spec.outputs == 'tensor' else spec.outputs} output")
    if "mask" in ctx.arguments:
        found.add(f"{spec.mask} mask argument" if spec.mask_given else "optional argument None")
    if len(example_arguments(spec, ctx, False)) < len(arguments(ctx)):
        found.add("default argument")
    if spec.train_mode:
        found.add("train-mode model")
    return found


def output_statement(spec: FuzzSpec, ctx: Context) -> str:
    taps = ctx.taps or ["x.mean(1)"]
    copy = ["x_in.clone()"] if spec.input_copy else []
    form = "tuple" if spec.outputs == "tensor" and copy else spec.outputs
    if form == "tensor":
        return "return x"
    if form == "tuple":
        return f"return {', '.join(['x', *ctx.taps, *copy])}"
    if form == "list":
        return f"return [{', '.join([*taps, 'x', *copy])}]"
    if form == "dict":
        items = ['"out": x'] + [f'"feat{i}": {t}' for i, t in enumerate(taps)]
        items += [f'"input": {c}' for c in copy]
        return f"return {{{', '.join(items)}}}"
    inner = [f'"feats": [{", ".join(ctx.taps)}]', '"pooled": x.mean(1)']
    inner += [f'"input": {c}' for c in copy]
    return f"return x, {{{', '.join(inner)}}}"


def arguments(ctx: Context) -> list[str]:
    """The forward's arguments after x, in signature order."""
    return [name for name in DEFAULTS if name in ctx.arguments]


def example_arguments(spec: FuzzSpec, ctx: Context, other: bool) -> list[str]:
    """The source of each argument after x in the example call (or, `other`, a call with
    other values for every non-tensor argument, and None for a mask given or the reverse)."""
    values = {
        "mask": "mask" if spec.mask_given != other else "None",
        "scale": repr(spec.scale + 1 if other else spec.scale),
        "flag": repr(not spec.flag if other else spec.flag),
    }
    names = arguments(ctx)
    given = [values[name] for name in names]
    while spec.omit_defaults and not other and names and given[-1] == repr(DEFAULTS[names[-1]]):
        names, given = names[:-1], given[:-1]
    return given


def inputs_source(spec: FuzzSpec, ctx: Context) -> str:
    """`make_inputs(batch, seed, other_arguments=False)`: the example call's arguments."""
    shape = (spec.channels, spec.height, spec.width)
    if spec.mode == "tokens":
        shape = (spec.height * spec.width, spec.channels)
    lines = ["g = torch.Generator().manual_seed(seed)"]
    lines.append(f"x = torch.randn((batch, {', '.join(map(str, shape))}), generator=g)")
    if "mask" in ctx.arguments:
        lines += mask_source(spec)
    same, other = example_arguments(spec, ctx, False), example_arguments(spec, ctx, True)
    lines.append(
        f"if other_arguments:\n    return (x, {', '.join(other)})" if other != same else ""
    )
    lines.append(f"return ({', '.join(['x', *same])}{'' if same else ','})")
    body = textwrap.indent("\n".join(line for line in lines if line), "    ")
    signature = "def make_inputs(batch: int, seed: int, other_arguments: bool = False) -> tuple:"
    return f'{signature}\n    """The example call\'s arguments."""\n{body}\n'


def mask_source(spec: FuzzSpec) -> list[str]:
    draw = f"torch.rand((batch, {spec.height * spec.width}), generator=g) > 0.5"
    if spec.mask == "bool":
        lines = [f"mask = {draw}"]
        keep, hide = "True", "False"
    else:
        hide = "torch.finfo(torch.float32).min" if spec.extreme_mask else "-1e4"
        lines = [f"mask = torch.where({draw}, 0.0, {hide})"]
        keep = "0.0"
    if spec.fully_masked:
        return [*lines, f"mask[0] = {hide}  # every key of the first example hidden"]
    return [*lines, f"mask[:, 0] = {keep}  # every row keeps a key"]


def model_source(spec: FuzzSpec) -> str:
    """Imports, the `Model` class, `init_weights` and `make_inputs`."""
    w, ctx = render(spec)
    signature = ", ".join(["self", "x"] + [SIGNATURE[name] for name in arguments(ctx)])
    prologue = ["B = x.shape[0]"] + (["x_in = x"] if spec.input_copy else [])
    title = "A model drawn by fxopt.testing.fuzz. Idioms: " + ", ".join(sorted(ctx.idioms))
    return "\n".join(
        [
            HEADER.format(title=title, spec=spec),
            "",
            "class Model(nn.Module):",
            "    def __init__(self):",
            textwrap.indent("\n".join(["super().__init__()", *w.init]), " " * 8),
            "",
            f"    def forward({signature}):",
            textwrap.indent("\n".join(prologue + w.forward), " " * 8),
            "",
            "",
            inspect.getsource(randomize_batch_norm),
            INIT_WEIGHTS,
            "",
            inputs_source(spec, ctx),
        ]
    )


def script(spec: FuzzSpec, passes=None, vary_arguments: bool = False) -> str:
    """A self-contained script that rebuilds the model and its example inputs, and checks
    them as the fuzzer did."""
    check = f"batch={spec.batch}, seed={spec.input_seed}, passes={passes!r}"
    check += ", vary_arguments=True" if vary_arguments else ""
    return "\n".join(
        [
            model_source(spec),
            "",
            f"model = init_weights(Model(), seed={spec.seed}){'.train()' * spec.train_mode}",
            f"inputs = make_inputs({spec.batch}, seed={spec.input_seed})",
            "",
            'if __name__ == "__main__":',
            "    from fxopt.testing.fuzz import check_model",
            "",
            "    # optimize(model, inputs), then compare with eager on inputs and fresh inputs",
            f"    print(check_model(model, make_inputs, {check}))",
            "",
        ]
    )


_counter = itertools.count()


def build(spec: FuzzSpec) -> tuple[nn.Module, Callable[..., tuple], set[str]]:
    """The eval-mode model, its `make_inputs`, and the idioms it uses, by running the script."""
    source = model_source(spec)
    filename = f"<fxopt fuzz model {next(_counter)}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    namespace: dict = {"__name__": "fxopt_fuzz_model"}
    exec(compile(source, filename, "exec"), namespace)  # noqa: S102  (our own generated code)
    model = namespace["init_weights"](namespace["Model"](), spec.seed).train(spec.train_mode)
    return model, namespace["make_inputs"], render(spec)[1].idioms
