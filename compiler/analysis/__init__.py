"""Analyses and tensor math: what a graph computes and costs, and the weight arithmetic of the
rewrites. Pure functions of graphs and tensors, tested on their own; imports only `fxopt.ir`.

`cost` is the cost model (FLOPs, bytes, roofline) that rewrites which can slow a model down ask
first; `linear_combination` reads a value off the graph as a sum of linear maps of its inputs;
`affine`, `kernels`, `channel_math`, `decompose_math` and `sequential_math` are the tensor math
of folding, merging and splitting weights; `attention_match` reads the attention shapes that
the attention passes rewrite; `preconditions` and `lowrank` hold what more than one pass checks
or shares, so that no pass imports another.
"""
