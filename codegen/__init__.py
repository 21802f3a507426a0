"""Lowering to Apache TVM (Relax/TIR), schedules, build and runtime.

`lower.build` turns an optimized ATen graph into a TVM executable, `runtime.TVMModule` calls it
like the model, `artifact` exports and loads it, `partition` keeps ops TVM cannot take in
PyTorch, `tuning_db` reads and writes the schedules `fxopt tune` (`fxopt.tune`) finds. Only
`tvm_api` imports TVM, and only on first use, so `import fxopt` (which imports this package)
stays TVM-free. Nothing here optimizes a model: that is the driver's (`fxopt.deploy`).
"""
