"""Cost of TTM's added layers: one TTM block (masked self- and cross-attention added) against the plain Wan block.

    python bench/attention.py [--tokens 256,1024,4096] [--dim 512] [--heads 4] [--ffn 1536] [--repeats 3]
                              [--impl xla] [--unmasked]

For each token count N, both blocks (`ttm_jax.models.dit.DiTBlock`, ttm=False / ttm=True) are jitted on the same
inputs (batch 1, a caption of 64 tokens, 4 local-prompt slots of 16 tokens, ids of three objects and background,
the added layers' output projections non-zero), and the script prints:

  time      best wall time of the forward over `--repeats` runs after one warm-up, plain and TTM runs alternating
            (same process, same inputs), so that load from other processes hits both alike
  fwd mem   peak memory XLA plans for the forward: arguments + outputs + temporaries (`compiled.memory_analysis()`,
            no run needed); `grad mem` the same for the gradient w.r.t. the block's params and input

and the TTM / plain ratios. The absolute figures depend on the machine; the ratios are the result. Defaults are the
`mid` config's model shapes (dim 512, 4 heads, FFN 1536). With the dense-mask `xla` reference path, the masked
layers add O(N^2) work and memory like the block's own self-attention; `--impl splash|gpu` on TPU/GPU measures the
id-based kernels.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout, uninstalled

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from ttm_jax.models import dit, layers  # noqa: E402

MB = 2.0**20


def _grid(n: int) -> tuple[int, int, int]:
    """A (t, h, w) token grid with n = t*h*w tokens, t = 4 frames where possible."""
    t = 4 if n % 4 == 0 else 1
    hw = n // t
    h = int(np.sqrt(hw))
    while hw % h:
        h -= 1
    return t, h, hw // h


def _ids(grid: tuple[int, int, int], slots: int, lp: int) -> tuple[np.ndarray, np.ndarray]:
    """Token ids (three objects in quadrants, background elsewhere) [1, N] and local-prompt ids [1, slots*lp]."""
    t, h, w = grid
    ids = np.zeros((t, h, w), np.int32)
    ids[:, : h // 2, : w // 2] = 1
    ids[:, : h // 2, w // 2:] = 2
    ids[: max(1, t // 2), h // 2:, : w // 2] = 3
    local = np.full((slots, lp), -1, np.int32)
    for s in range(slots):
        local[s, : lp // 2 + s] = s
    return ids.reshape(1, -1), local.reshape(1, -1)


def _memory(compiled) -> float:
    m = compiled.memory_analysis()
    if m is None:
        return float("nan")
    return (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
            - m.alias_size_in_bytes) / MB


def build(n: int, cfg: dit.DiTConfig, ttm: bool):
    """(run() -> forward output, fwd MB, grad MB) for one block at n tokens."""
    rng = np.random.default_rng(0)
    normal = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
    slots, lp, lc = 4, 16, 64
    grid = _grid(n)
    x = normal(1, n, cfg.dim)
    context = normal(1, lc, cfg.dim)
    local = normal(1, slots * lp, cfg.dim)
    modulation = 0.1 * normal(1, 6, cfg.dim)
    cos, sin = layers.rope_3d(cfg.head_dim, grid, cfg.rope_max_seq_len)
    token_ids, local_ids = _ids(grid, slots, lp)
    token_ids, local_ids = jnp.asarray(token_ids), jnp.asarray(local_ids)
    args = (context, modulation, cos, sin, local, token_ids, token_ids, local_ids)
    block = dit.DiTBlock(cfg, ttm=ttm)
    params = nn.unbox(jax.jit(block.init)(jax.random.key(0), x, *args))["params"]
    # trained-like added layers: non-zero output projections (they are zero at init)
    params = jax.tree_util.tree_map_with_path(
        lambda p, v: 0.02 * normal(*v.shape) if "masked" in jax.tree_util.keystr(p) and "to_out" in
        jax.tree_util.keystr(p) else v, params)

    fwd = jax.jit(lambda p, x: block.apply({"params": p}, x, *args)[0])
    grad = jax.jit(jax.grad(lambda p, x: jnp.sum(block.apply({"params": p}, x, *args)[0]), argnums=(0, 1)))
    fwd_c = fwd.lower(params, x).compile()
    grad_c = grad.lower(params, x).compile()
    run = lambda: fwd_c(params, x).block_until_ready()
    run()  # warm-up
    return run, _memory(fwd_c), _memory(grad_c)


def measure(n: int, cfg: dit.DiTConfig, repeats: int) -> dict[str, dict[str, float]]:
    """Both blocks at n tokens; runs alternate plain / ttm so that machine load hits both alike; best time kept."""
    built = {name: build(n, cfg, ttm) for name, ttm in (("plain", False), ("ttm", True))}
    times: dict[str, list[float]] = {"plain": [], "ttm": []}
    for _ in range(repeats):
        for name, (run, _, _) in built.items():
            t0 = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t0)
    return {name: {"ms": 1e3 * min(times[name]), "fwd_mb": fwd_mb, "grad_mb": grad_mb}
            for name, (_, fwd_mb, grad_mb) in built.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="256,1024,4096")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--ffn", type=int, default=1536)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--impl", default="xla")
    ap.add_argument("--unmasked", action="store_true", help="the TI2V baseline: added layers without masks")
    args = ap.parse_args()
    cfg = dit.DiTConfig(dim=args.dim, num_layers=1, num_heads=args.heads, ffn_dim=args.ffn, text_dim=args.dim,
                        freq_dim=256, ttm_layers=1, attention=args.impl, ttm_masked=not args.unmasked)
    print(f"# one block, dim {cfg.dim}, {cfg.num_heads} heads of {cfg.head_dim}, FFN {cfg.ffn_dim}, batch 1, "
          f"impl={cfg.attention}, masked={cfg.ttm_masked}, backend={jax.default_backend()}, "
          f"{jax.devices()[0].device_kind}")
    head = (f"{'tokens':>7} | {'plain ms':>9} {'ttm ms':>9} {'ratio':>6} | {'plain fwd MB':>12} {'ttm fwd MB':>10} "
            f"{'ratio':>6} | {'plain grad MB':>13} {'ttm grad MB':>11} {'ratio':>6}")
    print(head)
    print("-" * len(head))
    for n in (int(v) for v in args.tokens.split(",")):
        m = measure(n, cfg, args.repeats)
        plain, ttm = m["plain"], m["ttm"]
        print(f"{n:>7} | {plain['ms']:>9.1f} {ttm['ms']:>9.1f} {ttm['ms'] / plain['ms']:>6.2f} | "
              f"{plain['fwd_mb']:>12.1f} {ttm['fwd_mb']:>10.1f} {ttm['fwd_mb'] / plain['fwd_mb']:>6.2f} | "
              f"{plain['grad_mb']:>13.1f} {ttm['grad_mb']:>11.1f} {ttm['grad_mb'] / plain['grad_mb']:>6.2f}",
              flush=True)


if __name__ == "__main__":
    main()
