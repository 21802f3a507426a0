"""Shared settings for the TVM codegen tests.

Builds use LLVM at opt-level 0 (the `fast_llvm` target): compiling is several times faster and
the generated code computes the same thing; speed is measured by `fxopt bench`, not here.
"""

import pytest

pytest.importorskip("tvm")


@pytest.fixture(scope="session")
def fast_llvm() -> dict:
    return {"kind": "llvm", "opt-level": 0}
