"""Cost of TTM's added layers: one TTM block (masked self- and cross-attention added) against the plain Wan block.

    python bench/attention.py [--tokens 256,1024,4096] [--dim 512] [--heads 4] [--ffn 1536] [--repeats 3]
                              [--impl xla] [--unmasked] [--sparse]
    python bench/attention.py --scenes [--repeats 5] [--sav-sample shared/data/sav_sample]

For each token count N, both blocks (`ttm_jax.backbones.wan.model.DiTBlock`, ttm=False / ttm=True) are jitted on the
same inputs (batch 1, a caption of 64 tokens, 4 local-prompt slots of 16 tokens, ids of three objects and background,
the added layers' output projections non-zero), and the script prints:

  time      best wall time of the forward over `--repeats` runs after one warm-up, plain and TTM runs alternating
            (same process, same inputs), so that load from other processes hits both alike
  fwd mem   peak memory XLA plans for the forward: arguments + outputs + temporaries (`compiled.memory_analysis()`,
            no run needed); `grad mem` the same for the gradient w.r.t. the block's params and input

and the TTM / plain ratios. The absolute figures depend on the machine; the ratios are the result. Defaults are the
`mid` config's model shapes (dim 512, 4 heads, FFN 1536). With the dense-mask `xla` reference path, the masked
layers add O(N^2) work and memory like the block's own self-attention; `--impl splash|gpu` on TPU/GPU measures the
id-based kernels. `--sparse` runs the TTM block with `model.attention_sparse` (ttm_jax/models/sparse_attention.py).

`--scenes`: object-sparse masked self-attention on scenes of realistic segment sizes (4 latent frames of 32 x 32
tokens, N = 4096; the SA-V scene 4 x 40 x 24 = 3840 from the real sample's first-frame manual masks, resized to the
token grid by area majority and held over the frames). Per scene: the segment sizes, the share of the N^2 (query,
key) pairs the masks allow (sum_k n_k^2 / N^2) and the share the sparse op computes (its block pairs), then the
forward times of the plain block, the TTM block with the dense `xla` reference and the TTM block with
`attention_sparse`, and the TTM / plain ratios beside the ideal ratio: the FLOPs (matmuls: projections, attention
over the allowed pairs only, FFN) of the TTM block over those of the plain block. `meas/ideal` is the sparse ratio
over the ideal one (goal: <= 1.15). The ids and the object sort are jit arguments (not folded into the program); the
sort, done once per forward pass in the DiT, is inside the timed TTM block here.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout, uninstalled

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from ttm_jax.backbones.wan import model as dit  # noqa: E402
from ttm_jax.data import sav  # noqa: E402
from ttm_jax.models import layers, sparse_attention  # noqa: E402

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


def build(n: int, cfg: dit.DiTConfig, ttm: bool, ids: np.ndarray | None = None,
          grid: tuple[int, int, int] | None = None, slots: int = 4):
    """(run() -> forward output, fwd MB, grad MB) for one block at n tokens; `ids` [1, n] (default: `_ids`)."""
    rng = np.random.default_rng(0)
    normal = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)  # noqa: E731
    lp, lc = 16, 64
    grid = grid or _grid(n)
    x = normal(1, n, cfg.dim)
    context = normal(1, lc, cfg.dim)
    local = normal(1, slots * lp, cfg.dim)
    modulation = 0.1 * normal(1, 6, cfg.dim)
    cos, sin = layers.rope_3d(cfg.head_dim, grid, cfg.rope_max_seq_len)
    token_ids, local_ids = _ids(grid, slots, lp)
    if ids is not None:
        token_ids = ids
    token_ids, local_ids = jnp.asarray(token_ids), jnp.asarray(local_ids)
    block = dit.DiTBlock(cfg, ttm=ttm)
    sparse = ttm and cfg.attention_sparse

    def apply(p, x, token_ids, local_ids):
        self_ids = sparse_attention.sort_objects(token_ids, impl=cfg.attention) if sparse else token_ids
        return block.apply({"params": p}, x, context, modulation, cos, sin, local, self_ids, token_ids, local_ids)[0]

    params = nn.unbox(jax.jit(block.init)(jax.random.key(0), x, context, modulation, cos, sin, local, token_ids,
                                          token_ids, local_ids))["params"]
    # trained-like added layers: non-zero output projections (they are zero at init)
    params = jax.tree_util.tree_map_with_path(
        lambda p, v: 0.02 * normal(*v.shape) if "masked" in jax.tree_util.keystr(p) and "to_out" in
        jax.tree_util.keystr(p) else v, params)

    fwd = jax.jit(apply)
    grad = jax.jit(jax.grad(lambda p, x, i, li: jnp.sum(apply(p, x, i, li)), argnums=(0, 1)))
    fwd_c = fwd.lower(params, x, token_ids, local_ids).compile()
    grad_c = grad.lower(params, x, token_ids, local_ids).compile()
    run = lambda: fwd_c(params, x, token_ids, local_ids).block_until_ready()  # noqa: E731
    run()  # warm-up
    return run, _memory(fwd_c), _memory(grad_c)


def _best_times(runs: dict, repeats: int) -> dict[str, float]:
    """Best wall time in ms of each `run()`, the runs alternating so that machine load hits them alike."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            t0 = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t0)
    return {name: 1e3 * min(t) for name, t in times.items()}


def measure(n: int, cfg: dit.DiTConfig, repeats: int) -> dict[str, dict[str, float]]:
    """Both blocks at n tokens; runs alternate plain / ttm so that machine load hits both alike; best time kept."""
    built = {name: build(n, cfg, ttm) for name, ttm in (("plain", False), ("ttm", True))}
    ms = _best_times({name: run for name, (run, _, _) in built.items()}, repeats)
    return {name: {"ms": ms[name], "fwd_mb": fwd_mb, "grad_mb": grad_mb}
            for name, (_, fwd_mb, grad_mb) in built.items()}


# ---- scenes of realistic segment sizes (--scenes) -------------------------------------------------------------------

SCENE_GRID = (4, 32, 32)
SAV_GRID = (4, 40, 24)  # SA-V's 848 x 480 (H x W) portrait frames


def _scene(grid: tuple[int, int, int], shares: list[float], seed: int) -> np.ndarray:
    """ids [1, N]: objects 1..K with the given token shares (the rest background), placed at random."""
    n = int(np.prod(grid))
    counts = [int(round(s * n)) for s in shares]
    ids = np.zeros(n, np.int32)
    ids[: sum(counts)] = np.repeat(np.arange(1, len(counts) + 1), counts)
    return np.random.default_rng(seed).permutation(ids)[None]


def _sav_scene(sample: str, grid: tuple[int, int, int]) -> np.ndarray | None:
    """ids [1, N] from the real SA-V sample's first annotated frame (manual masklets), area majority per token
    cell, the same in every latent frame; None without the sample."""
    path = os.path.join(sample, "sav_000001_manual.json")
    if not os.path.exists(path):
        print(f"# {path} missing: the SA-V scene is skipped (--sav-sample names the folder)")
        return None
    ann = sav.read_annotation(sav.VideoRef("sav_000001", sav.Source(""), (("manual", sav.Source(path)),)))
    m = ann.masks([0])[0]  # [H, W, K]
    pixel = np.zeros(m.shape[:2], np.int32)
    for i in range(m.shape[-1] - 1, -1, -1):  # lower masklet on top, as masks.pixel_ids_from_masks
        pixel[m[..., i]] = i + 1
    t, gh, gw = grid
    rows = np.linspace(0, pixel.shape[0], gh + 1).astype(int)
    cols = np.linspace(0, pixel.shape[1], gw + 1).astype(int)
    cells = np.zeros((gh, gw), np.int32)
    for r in range(gh):
        for c in range(gw):
            counts = np.bincount(pixel[rows[r]:rows[r + 1], cols[c]:cols[c + 1]].ravel(), minlength=m.shape[-1] + 1)
            cells[r, c] = int(np.argmax(counts))  # ties to the lower id (background first)
    return np.broadcast_to(cells, (t, gh, gw)).reshape(1, -1).astype(np.int32)


def scenes(sample: str) -> list[tuple[str, tuple[int, int, int], np.ndarray]]:
    out = [
        ("quadrants", SCENE_GRID, _ids(SCENE_GRID, 4, 16)[0]),
        ("one_large", SCENE_GRID, _scene(SCENE_GRID, [0.5], 1)),
        ("few_medium", SCENE_GRID, _scene(SCENE_GRID, [0.20, 0.12, 0.08, 0.05], 2)),
        ("many_small", SCENE_GRID, _scene(SCENE_GRID, [0.04] * 10, 3)),
    ]
    sav_ids = _sav_scene(sample, SAV_GRID)
    if sav_ids is not None:
        out.append(("sav_000001", SAV_GRID, sav_ids))
    out.append(("background", SCENE_GRID, np.zeros((1, int(np.prod(SCENE_GRID))), np.int32)))
    return out


def block_flops(cfg: dit.DiTConfig, ids: np.ndarray, slots: int, lp: int, lc: int, ttm: bool) -> float:
    """Matmul FLOPs of one block's forward (2 per multiply-add): projections, attention over the pairs the masks
    allow (plain self-attention: all N^2; masked self-attention: sum_k n_k^2; masked cross-attention: each token
    against its own slot's real prompt tokens), FFN. Norms, RoPE, modulation, softmax are left out."""
    d, f = cfg.dim, cfg.ffn_dim
    ids = np.asarray(ids).reshape(-1)
    n = ids.size
    attn = lambda pairs: 4.0 * pairs * d  # noqa: E731  (q k^T and p v)
    flops = 8.0 * n * d * d + attn(n * n)  # self-attention: q, k, v, out; all pairs
    flops += 4.0 * n * d * d + 4.0 * lc * d * d + attn(n * lc)  # caption cross-attention: q, out; k, v
    flops += 4.0 * n * d * f  # FFN
    if ttm:
        sizes = np.bincount(ids[ids >= 0])
        flops += 8.0 * n * d * d + attn(float(np.sum(sizes.astype(np.float64) ** 2)))
        real = np.minimum(lp, lp // 2 + np.arange(slots))  # real tokens per slot, as `_ids` makes them
        per_token = np.where(ids < slots, real[np.clip(ids, 0, slots - 1)], real[0])  # no slot: the caption's
        flops += 4.0 * n * d * d + 4.0 * slots * lp * d * d + attn(float(per_token.sum()))
    return flops


def run_scenes(cfg: dit.DiTConfig, repeats: int, sample: str) -> None:
    dense_cfg = dataclasses.replace(cfg, attention_sparse=False)
    sparse_cfg = dataclasses.replace(cfg, attention_sparse=True)
    head = (f"{'scene':>11} {'N':>5} {'K':>3} {'bg %':>5} {'max obj %':>9} {'allowed':>7} {'computed':>8} | "
            f"{'plain ms':>8} {'dense ms':>8} {'sparse ms':>9} | {'dense x':>7} {'sparse x':>8} {'ideal x':>7} "
            f"{'meas/ideal':>10}")
    print(head)
    print("-" * len(head))
    for name, grid, ids in scenes(sample):
        n = ids.size
        slots = int(ids.max()) + 1
        sizes = np.bincount(ids.reshape(-1))
        sort = sparse_attention.sort_objects(jnp.asarray(ids), impl=dense_cfg.attention)
        computed = float(sort.pairs()[0]) * sort.block * sort.block_kv / n**2
        allowed = float(np.sum(sizes.astype(np.float64) ** 2)) / n**2
        runs = {"plain": build(n, dense_cfg, False, ids, grid, slots)[0],
                "dense": build(n, dense_cfg, True, ids, grid, slots)[0],
                "sparse": build(n, sparse_cfg, True, ids, grid, slots)[0]}
        ms = _best_times(runs, repeats)
        ideal = block_flops(cfg, ids, slots, 16, 64, True) / block_flops(cfg, ids, slots, 16, 64, False)
        dense_x, sparse_x = ms["dense"] / ms["plain"], ms["sparse"] / ms["plain"]
        print(f"{name:>11} {n:>5} {np.count_nonzero(sizes[1:]):>3} {100 * sizes[0] / n:>5.1f} "
              f"{100 * (sizes[1:].max() if len(sizes) > 1 else 0) / n:>9.1f} {allowed:>7.3f} {computed:>8.3f} | "
              f"{ms['plain']:>8.1f} {ms['dense']:>8.1f} {ms['sparse']:>9.1f} | {dense_x:>7.2f} {sparse_x:>8.2f} "
              f"{ideal:>7.2f} {sparse_x / ideal:>10.2f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="256,1024,4096")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--ffn", type=int, default=1536)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--impl", default="xla")
    ap.add_argument("--unmasked", action="store_true", help="the TI2V baseline: added layers without masks")
    ap.add_argument("--sparse", action="store_true", help="model.attention_sparse: object-sparse masked self-attn")
    ap.add_argument("--scenes", action="store_true", help="sparse vs dense vs ideal on scenes of realistic objects")
    ap.add_argument("--sav-sample", default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                         "..", "shared", "data", "sav_sample"))
    args = ap.parse_args()
    cfg = dit.DiTConfig(dim=args.dim, num_layers=1, num_heads=args.heads, ffn_dim=args.ffn, text_dim=args.dim,
                        freq_dim=256, ttm_layers=1, attention=args.impl, ttm_masked=not args.unmasked,
                        attention_sparse=args.sparse)
    print(f"# one block, dim {cfg.dim}, {cfg.num_heads} heads of {cfg.head_dim}, FFN {cfg.ffn_dim}, batch 1, "
          f"impl={cfg.attention}, masked={cfg.ttm_masked}, backend={jax.default_backend()}, "
          f"{jax.devices()[0].device_kind}")
    if args.scenes:
        print(f"# forward, best of {args.repeats}; allowed / computed: share of the N^2 pairs; x: TTM / plain time; "
              f"ideal x: TTM / plain matmul FLOPs with only the allowed pairs")
        run_scenes(cfg, args.repeats, args.sav_sample)
        return
    if args.sparse:
        print("# attention_sparse: object-sparse masked self-attention")
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
