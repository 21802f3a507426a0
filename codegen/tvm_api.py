"""The one place fxopt imports Apache TVM (pinned: apache-tvm 0.27.0.post1).

TVM's Python API moves between 0.2x releases (targets are JSON dicts, scheduling lives in
`tvm.s_tir`, TIR in `tvm.tirx`), so every other codegen module reaches TVM through this
adapter: `from fxopt.codegen import tvm_api as tv`, then `tv.tvm`, `tv.relax`, `tv.te`,
`tv.tirx`, `tv.s_tir`, `tv.dlight`, `tv.topi`. Importing this module imports TVM; importing
`fxopt` or `fxopt.codegen` does not.
"""

from __future__ import annotations

import tvm
from tvm import relax, s_tir, te, tirx, topi
from tvm.s_tir import dlight

__all__ = ["dlight", "relax", "s_tir", "te", "tirx", "topi", "tvm"]
