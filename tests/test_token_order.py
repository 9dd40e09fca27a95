"""The object ids of `masks.token_ids_from_masks` / `token_ids_from_boxes` are in the DiT's token order.

`test_masks.py` checks the ids against its own oracle of the (t, h, w) order; nothing else ties them to the order in
which the DiT (`ttm_jax/backbones/wan/model.py`) lays out its tokens, so ids in (h, w, t) order pass every other test.
Here a spike (one object covering exactly the pixels of one token's latent cells at one latent frame, background
elsewhere) goes through both id functions (the spike is its own box), and the DiT's own index of that token is found
from the model: the one token of the first block's (per-token) `norm1` output that changes when a latent cell of the
spike changes. The token there must carry the object's id, every other token the background's.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ttm_jax.backbones.wan import model as dit
from ttm_jax.models import masks

O0 = {"xla_backend_optimization_level": 0}
C = 4  # latent channels
TF, SF = 4, 2  # the autoencoder's time / space compression
LATENT = (3, 4, 6)  # T', H', W': every axis a different size, so (t, h, w) and (h, w, t) orders differ
K = 3  # object slots; the spike is object OBJ, the others absent
OBJ = 2


def _spike(token: tuple[int, int, int], patch: tuple[int, int, int]) -> np.ndarray:
    """bool `[1, T, H, W, K]` pixel masks: object OBJ covers exactly the pixel-frames of `token`'s latent cells."""
    t, h, w = LATENT
    m = np.zeros((1, 1 + (t - 1) * TF, h * SF, w * SF, K), bool)
    (tt, th, tw), (pt, ph, pw) = token, patch
    for lt in range(tt * pt, (tt + 1) * pt):
        frames = [0] if lt == 0 else list(range(1 + (lt - 1) * TF, 1 + lt * TF))  # causal: frame 0 alone
        for f in frames:
            m[0, f, th * ph * SF:(th + 1) * ph * SF, tw * pw * SF:(tw + 1) * pw * SF, OBJ - 1] = True
    return m


@pytest.fixture(scope="module", params=[(1, 1, 1), (1, 2, 2)], ids=["patch111", "patch122"])
def dit_tokens(request):
    """`(patch, x [1, T', H', W', 3C] -> first block's norm1 output [1, N, dim])`, jitted once per patch size."""
    patch = request.param
    cfg = dit.DiTConfig(dim=24, num_layers=1, num_heads=2, ffn_dim=32, text_dim=8, freq_dim=16, ttm_layers=1,
                        patch_size=patch, scan_layers=False)
    model = dit.DiT(cfg, 3 * C, C)
    n = int(np.prod([s // p for s, p in zip(LATENT, patch, strict=True)]))
    args, kw = dit.init_inputs(cfg, 3 * C, grid=LATENT)
    params = jax.jit(model.init).lower(jax.random.key(0), *args, **kw).compile(compiler_options=O0)(
        jax.random.key(0), *args, **kw)
    params = nn.unbox(params)["params"]
    _, t, context = args
    assert kw["token_ids"].shape == (1, n)

    def norm1(x):
        _, state = model.apply({"params": params}, x, t, context, **kw, mutable=["intermediates"],
                               capture_intermediates=lambda _, name: name == "__call__")
        (out,) = state["intermediates"]["blocks_0"]["norm1"]["__call__"]
        return out

    x0 = jnp.asarray(np.random.default_rng(0).standard_normal((1, *LATENT, 3 * C)), jnp.float32)
    compiled = jax.jit(norm1).lower(x0).compile(compiler_options=O0)
    return patch, x0, lambda x: np.asarray(compiled(x))


# token-grid positions at the first and later latent frames whose index differs between (t, h, w) and (h, w, t)
TOKENS = [(0, 1, 2), (1, 0, 1), (2, 1, 0), (1, 1, 1)]


@pytest.mark.parametrize("token", TOKENS, ids=[f"t{t}h{h}w{w}" for t, h, w in TOKENS])
def test_spike_token_carries_the_object_id(dit_tokens, token):
    patch, x0, tokens_of = dit_tokens
    # the DiT's index of the token: the only one that changes when one latent cell of the spike changes
    lt, lh, lw = (i * p + p - 1 for i, p in zip(token, patch, strict=True))  # the token's last latent cell
    x1 = x0.at[0, lt, lh, lw].add(3.0)
    changed = np.flatnonzero(np.abs(tokens_of(x1) - tokens_of(x0)).max(axis=-1)[0] > 0)
    assert changed.size == 1, changed
    index = int(changed[0])

    geo = dict(time_factor=TF, space_factor=SF, patch_size=patch)
    spike = _spike(token, patch)
    for fn in (masks.token_ids_from_masks, masks.token_ids_from_boxes):  # self- and cross-attention ids
        ids = np.asarray(jax.jit(lambda m, fn=fn: fn(m, **geo))(spike))
        assert ids.shape == (1, tokens_of(x0).shape[1]), fn.__name__
        assert ids[0, index] == OBJ, (fn.__name__, index, np.flatnonzero(ids[0]))
        assert (np.delete(ids[0], index) == masks.BACKGROUND).all(), fn.__name__
