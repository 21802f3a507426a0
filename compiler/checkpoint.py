"""Checkpoints that put a graph module back as it was before a pass, when the pass fails.

`graph.snapshot` copies a whole GraphModule, module tree and generated code included; a pipeline
takes one checkpoint per pass and rarely restores it, so a checkpoint copies only what a pass may
change (the graph's nodes, and which tensors and submodules each module holds) and `restore`
rebuilds the module in place. Tensors are shared, not copied: a pass that writes into one in
place cannot be undone, and `written_in_place` says which it wrote (as far as the tensors'
version counters tell: a write through `.data` goes unseen, and is left to verification).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import fx, nn

from .ir.graph import constant


@dataclass(frozen=True)
class Checkpoint:
    graph: fx.Graph
    tables: list[tuple[nn.Module, dict, dict, dict, dict]]  # parameters, buffers, modules, tensors
    versions: dict[str, tuple[torch.Tensor, int]]  # get_attr target -> tensor, its version


def checkpoint(gm: fx.GraphModule) -> Checkpoint:
    """What `restore` needs to undo a pass on `gm`."""
    tables = [
        (m, dict(m._parameters), dict(m._buffers), dict(m._modules), _plain_tensors(m))
        for m in gm.modules()
    ]
    versions = {}
    for node in gm.graph.find_nodes(op="get_attr"):
        tensor = constant(gm, node)
        if tensor is not None and not tensor.is_inference():  # those keep no version counter
            versions[node.target] = (tensor, tensor._version)
    return Checkpoint(copy.deepcopy(gm.graph), tables, versions)


def restore(gm: fx.GraphModule, saved: Checkpoint) -> fx.GraphModule:
    """Put `gm` back as it was at `checkpoint(gm)` (once per checkpoint: `gm` takes its graph)."""
    for module, parameters, buffers, modules, tensors in saved.tables:
        for table, old in (
            (module._parameters, parameters),
            (module._buffers, buffers),
            (module._modules, modules),
        ):
            table.clear()
            table.update(old)
        for name in set(_plain_tensors(module)) - set(tensors):
            delattr(module, name)
        for name, tensor in tensors.items():
            object.__setattr__(module, name, tensor)
    gm.graph = saved.graph  # recompiles
    return gm


def written_in_place(saved: Checkpoint) -> list[str]:
    """The constants the graph read at the checkpoint whose tensors were written since."""
    return [name for name, (t, version) in saved.versions.items() if t._version != version]


def _plain_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """Tensors held as plain attributes (torch.export keeps lifted constants that way)."""
    return {k: v for k, v in vars(module).items() if isinstance(v, torch.Tensor)}
