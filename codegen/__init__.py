"""Lowering to Apache TVM (Relax/TIR), schedules, build and runtime.

`lower.build` turns an optimized ATen graph into a TVM executable, `runtime.TVMModule` calls it
like the model, `artifact` exports and loads it, `partition` keeps ops TVM cannot take in
PyTorch. Only `tvm_api` imports TVM, and nothing here is imported by `import fxopt`.
"""
