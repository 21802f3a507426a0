"""fxopt's built-in passes; importing this package registers them."""

from . import (  # noqa: F401
    fold_bn_into_next,
    fold_channel_affine,
    fold_constants,
    fold_conv_bn,
    fold_linear_bn,
    remove_noops,
)
