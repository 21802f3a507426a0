"""Lowering to Apache TVM (Relax/TIR), schedules, build and runtime: not built yet.

Nothing here imports TVM; `import fxopt` never does.
"""
