"""The pass tests share plain helper functions in `helpers.py` (this folder); this puts the
folder on the import path so that `from helpers import seeded` works whichever import mode
pytest runs in."""

import pathlib
import sys

HERE = str(pathlib.Path(__file__).resolve().parent)
if HERE not in sys.path:
    sys.path.insert(0, HERE)
