"""The paper's Table 3 rows as config switches, in the real DiT: each added layer masked or not.

  TTM                          ttm_masked=True                    self masked,   cross masked
  masked cross-attention only  ttm_masked_self=False              self unmasked, cross masked
  masked self-attention only   ttm_masked_cross=False             self masked,   cross unmasked
  no masked attention          ttm_masked=False                   self unmasked, cross unmasked
  TI2V                         stage 0 (configs/ti2v.py)          no trajectory input, both unmasked

Observed inside the first block's added layers (Flax `capture_intermediates`, unrolled blocks): with masked
self-attention, object A's outputs of that layer do not depend on object B's tokens; unmasked, they do. With masked
cross-attention, A's outputs of that layer do not depend on B's local prompt; unmasked, they do.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from ttm_jax import config as config_lib
from ttm_jax.backbones.wan import model as dit
from ttm_jax.models import masks, ttm_layers

O0 = {"xla_backend_optimization_level": 0}
C, PATCH, GRID = 4, (1, 1, 1), (1, 2, 4)  # 8 tokens: A on the first four, B on the last four
TEXT_DIM, S, LP = 16, 3, 2
BASE = dit.DiTConfig(dim=24, num_layers=1, num_heads=2, ffn_dim=32, text_dim=TEXT_DIM, freq_dim=16, ttm_layers=1,
                     patch_size=PATCH, scan_layers=False)
IDS = np.array([[1, 1, 1, 1, 2, 2, 2, 2]], np.int32)
ROWS = {"ttm": {}, "cross_only": {"ttm_masked_self": False}, "self_only": {"ttm_masked_cross": False},
        "none": {"ttm_masked": False}}


def _observe(cfg: dit.DiTConfig):
    model = dit.DiT(cfg, 3 * C, C)
    args, kw = dit.init_inputs(cfg, 3 * C)
    params = nn.unbox(jax.jit(model.init).lower(jax.random.key(0), *args, **kw).compile(compiler_options=O0)(
        jax.random.key(0), *args, **kw))["params"]
    rng = np.random.default_rng(1)
    flat = traverse_util.flatten_dict(jax.tree.map(np.asarray, params))
    # the added layers' zero-initialised output projections random; the block's own self-attention silenced, so that
    # the added self-attention is the only path between tokens before it
    flat = {k: (np.zeros_like(v) if "attn1" in k and "to_out" in k else
                (0.5 * rng.standard_normal(v.shape)).astype(v.dtype) if not v.any() else v) for k, v in flat.items()}
    params = traverse_util.unflatten_dict(flat)
    local_mask = np.ones((1, S, LP), bool)
    local_ids = masks.local_prompt_ids(jnp.asarray(local_mask))

    def run(params, x, local):
        _, state = model.apply({"params": params}, x, jnp.array([300.0]), jnp.ones((1, 2, TEXT_DIM)),
                               local_context=local, token_ids=jnp.asarray(IDS), cross_token_ids=jnp.asarray(IDS),
                               local_ids=local_ids, mutable=["intermediates"],
                               capture_intermediates=lambda m, _: isinstance(m, (ttm_layers.MaskedSelfAttention,
                                                                                  ttm_layers.MaskedCrossAttention)))
        inter = state["intermediates"]["blocks_0"]
        return inter["masked_self_attn"]["__call__"][0], inter["masked_cross_attn"]["__call__"][0]

    x = jnp.asarray(rng.standard_normal((1, *GRID, 3 * C)), jnp.float32)
    local = jnp.asarray(rng.standard_normal((1, S * LP, TEXT_DIM)), jnp.float32)
    compiled = jax.jit(run).lower(params, x, local).compile(compiler_options=O0)
    return lambda x_, local_: [np.asarray(o) for o in compiled(params, x_, local_)], x, local


@pytest.mark.parametrize("row", list(ROWS))
def test_each_row_masks_exactly_its_layers(row):
    cfg = dataclasses.replace(BASE, **ROWS[row])
    fn, x, local = _observe(cfg)
    self0, cross0 = fn(x, local)
    # perturb object B's tokens (the last four latent cells): does A's self-attention output move?
    b_cells = np.zeros((1, *GRID, 1), np.float32)
    b_cells[0, 0, 1, :] = 1.0
    self1, _ = fn(x + 3.0 * jnp.asarray(b_cells), local)
    a = IDS[0] == 1
    self_leaks = np.abs(self1[0, a] - self0[0, a]).max() > 1e-4
    # perturb object B's local prompt (slot 2): does A's cross-attention output move?
    slot_b = np.zeros((1, S * LP, 1), np.float32)
    slot_b[0, 2 * LP:3 * LP] = 1.0
    _, cross1 = fn(x, local + 3.0 * jnp.asarray(slot_b))
    cross_leaks = np.abs(cross1[0, a] - cross0[0, a]).max() > 1e-4
    assert self_leaks == (not cfg.mask_self), row
    assert cross_leaks == (not cfg.mask_cross), row
    if cfg.mask_self:
        np.testing.assert_array_equal(self1[0, a], self0[0, a])
    if cfg.mask_cross:
        np.testing.assert_array_equal(cross1[0, a], cross0[0, a])


def test_ti2v_has_no_trajectory_input_and_the_same_added_layers():
    """Stage 0: the input carries the noisy latent and the first frame only (2C channels, not 3C); its added layers
    are stage 2's, unmasked; the parameter counts differ by the trajectory channels of the patch embedding alone."""
    ti2v, two = config_lib.build(0), config_lib.build(2)
    c = ti2v.autoencoder.latent_channels
    assert config_lib.in_channels(ti2v) == 2 * c and config_lib.in_channels(two) == 3 * c
    assert ti2v.model.ttm_layers == two.model.ttm_layers > 0 and not ti2v.model.ttm_masked
    counts = {}
    for cfg in (ti2v, two):
        model = dit.DiT(cfg.model, config_lib.in_channels(cfg), c)
        args, kw = dit.init_inputs(dit.DiTConfig.from_config(cfg.model), config_lib.in_channels(cfg))
        shapes = jax.eval_shape(lambda r, m=model, a=args, k=kw: m.init(r, *a, **k), jax.random.key(0))["params"]
        counts[cfg.stage] = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(nn.unbox(shapes)))
    pt, ph, pw = two.model.patch_size
    assert counts[2] - counts[0] == c * pt * ph * pw * two.model.dim
    with pytest.raises(config_lib.ConfigError, match=r"config\.model\.ttm_masked: True but the TI2V baseline"):
        ti2v.model.ttm_masked = True
        config_lib.validate(ti2v)
