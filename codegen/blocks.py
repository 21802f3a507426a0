"""Relax converters for the fused-block ops `fuse_blocks` puts in the fx graph.

`CONVERTERS` maps an ATen-level op name to a converter for `from_exported_program`'s
`custom_convert_map`.
"""

from __future__ import annotations

CONVERTERS: dict = {}
