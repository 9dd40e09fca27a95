"""Rematerialisation (activation checkpointing) of a block class by `config.model.remat_policy`, defined once for the
backbones: `none` keeps every activation; `full` saves nothing and recomputes the block in the backward pass; `dots` /
`dots_no_batch` save the matmul outputs (with or without batch dimensions) and recompute the cheap elementwise rest.
Layer 1: imports nothing of ours.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax

POLICIES = {
    "full": None,  # save nothing: recompute the whole block
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def maybe_remat(cls: type[nn.Module], policy: str, **kwargs: Any) -> type[nn.Module]:
    """`cls` itself for policy `none`, else `nn.remat(cls, policy=POLICIES[policy], **kwargs)` (`static_argnums`:
    self = 0, of non-array arguments; `prevent_cse=False` inside a scan, where CSE across iterations cannot undo
    remat)."""
    if policy == "none":
        return cls
    return nn.remat(cls, policy=POLICIES[policy], **kwargs)
