"""Suite-wide settings: one intra-op thread, since the suite's graphs are tiny and CI machines
have two cores (thread start-up would otherwise dominate every small conv)."""

import torch

torch.set_num_threads(1)
