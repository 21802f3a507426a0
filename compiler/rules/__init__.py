"""The rule engine: what a pass is written with. Imports only `fxopt.ir` and `fxopt.analysis`.

`patterns` (`pattern`, `Pattern`) and `wildcards` (patterns written as PyTorch code, traced by
`pattern_trace`), `rewrite` (`Rule`, `decline` and the worklist driver that applies rules until
nothing changes), `registry` (`register_pass`, `list_passes`), `approximate` (what
`exact=False` passes return and how they are configured).
"""
