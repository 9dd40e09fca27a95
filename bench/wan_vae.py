"""Wan VAE memory: chunked over time (lax.scan carrying the causal caches) vs the whole clip in one pass.

    python bench/wan_vae.py [--frames 17,33] [--size 128x128] [--chunks 0,1] [--dtype float32]

For Wan 2.1's real widths (base_dim 96, dim_mult 1,2,4,4), compiles `encode` and `decode` for each clip length and
chunk setting and prints XLA's temporary-buffer size (`compiled.memory_analysis()`, no execution, so it runs on any
backend) as a ratio to the one-pass figure of the same clip. Chunked memory should stay flat as clips grow; one-pass
memory grows with the clip.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout, uninstalled

from ttm_jax.backbones.wan import vae as wan_vae  # noqa: E402

GB = 1e9


def temp_bytes(fn, *args) -> tuple[int, float]:
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    mem = compiled.memory_analysis()
    return int(mem.temp_size_in_bytes), time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", default="17,33")
    ap.add_argument("--size", default="128x128")
    ap.add_argument("--chunks", default="0,1")
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()
    h, w = (int(v) for v in args.size.split("x"))
    cfg = wan_vae.WanVAEConfig()
    model = wan_vae.WanVAE(cfg, dtype=jnp.dtype(args.dtype))
    params = wan_vae.param_shapes(model)
    chunks = [int(c) for c in args.chunks.split(",")]
    print(f"Wan 2.1 VAE widths, {h}x{w}, compute {args.dtype}, backend {jax.default_backend()}; "
          f"temp = XLA temporary buffers of the compiled function")
    for frames in (int(f) for f in args.frames.split(",")):
        video = jax.ShapeDtypeStruct((1, frames, h, w, 3), jnp.float32)
        lt = 1 + (frames - 1) // cfg.time_factor
        latent = jax.ShapeDtypeStruct((1, lt, h // 8, w // 8, cfg.z_dim), jnp.float32)
        for name, fn, x in (("encode", wan_vae.encode, video), ("decode", wan_vae.decode, latent)):
            ref = None
            for chunk in chunks:
                tb, sec = temp_bytes(lambda p, v, fn=fn, chunk=chunk: fn(model, p, v, chunk=chunk), params, x)
                ref = tb if ref is None else ref
                label = "one pass" if chunk == 0 else f"chunk={chunk}"
                print(f"  {name} T={frames:3d} {label:9s} temp {tb / GB:7.3f} GB  ({tb / ref:5.2f}x of "
                      f"chunk={chunks[0]})  [compiled in {sec:.0f}s]", flush=True)


if __name__ == "__main__":
    main()
