"""IR, the bottom layer: the fx graph the passes see, its ops, and fxopt's errors.

`graph` reads and writes nodes and weights (passes use it, not `gm` attributes), `ops` names
ATen op groups and reads their arguments, `layout` follows one axis through reshapes,
`block_ops` defines the fused-block ops `fuse_blocks` puts in the graph, `export` traces a module
into such a graph (models and patterns alike), `errors` holds fxopt's exception types (and
`first_line`, how a message quotes an error it wraps). Nothing here imports from another fxopt
layer.
"""
