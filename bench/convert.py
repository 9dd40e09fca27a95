"""Peak resident memory of checkpoint conversion, as a multiple of the checkpoint size, both directions.

    python bench/convert.py [--model vae|dit] [--gb 1.0] [--workdir /tmp/ttm_convert_bench] [--keep]

Writes a random checkpoint of about `--gb` GB (diffusers folder: config.json + safetensors): `vae`, the Wan 2.1 VAE
layout with its base width enlarged from 96; `dit`, WanTransformer3DModel at Wan2.1-T2V-1.3B's widths with as many
blocks as reach the size (stacked for `nn.scan` on the Flax side). Then it measures each conversion in its own
subprocess (the kernel's resident high-water mark VmHWM, reset right before converting, minus the RSS at that
moment: the Python + JAX import floor, plus the source params for flax -> torch):

  torch -> flax   ttm_jax.weights.{wan_vae,dit}.load_diffusers_folder (pread, tensor by tensor)
                  reference, same rulebook: memory-mapped reader (safetensors_io.SafetensorsReader)
                  reference, naive: safetensors.numpy.load_file (all tensors) then RuleBook.to_flax
  flax -> torch   ttm_jax.weights.{wan_vae,dit}.save_diffusers_folder (streamed safetensors writer), from params in
                  memory
                  reference, naive: RuleBook.to_torch (dict of all tensors) then safetensors.numpy.save_file

The flax -> torch rows start from the params already in memory (1x); their figure is the *extra* peak over that.
The written checkpoint is compared with the source byte for byte (the round trip is exact).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time

import numpy as np
from safetensors.numpy import load_file, save_file

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout, uninstalled

from ttm_jax.backbones.wan import model as dit_lib  # noqa: E402
from ttm_jax.backbones.wan import vae as wan_vae  # noqa: E402
from ttm_jax.backbones.wan import vae_weights as vae_convert  # noqa: E402
from ttm_jax.backbones.wan import weights as dit_convert  # noqa: E402
from ttm_jax.weights import rulebook as rb  # noqa: E402
from ttm_jax.weights import safetensors_io  # noqa: E402

GB = 1e9


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> None:
    """Resets the kernel's resident high-water mark (VmHWM) to the current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak() -> int:
    # VmHWM can be reset (below); ru_maxrss cannot, so it only bounds the first measurement
    return max(_status("VmHWM"), 0) if os.path.exists("/proc/self/clear_refs") else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class _Adapter:
    """What the bench needs of one model's converter: template, rulebook, streamed load and save."""

    def __init__(self, model: str, src: str):
        self.weights = os.path.join(src, vae_convert.WEIGHTS_FILE)
        if model == "vae":
            self.cfg = wan_vae.read_config(src)
            self.template = vae_convert.template(self.cfg)
            self.book = vae_convert.RULES
            self.load = lambda: vae_convert.load_diffusers_folder(src, self.cfg)
            self.save = lambda params, out: vae_convert.save_diffusers_folder(params, self.cfg, out)
        else:
            self.cfg, cin, cout = dit_convert.read_config(src)
            self.template = dit_convert.template(self.cfg, cin, cout)
            self.book = dit_convert.rulebook(self.cfg.scan_layers)
            self.load = lambda: dit_convert.load_diffusers_folder(src)[3]
            self.save = lambda params, out: dit_convert.save_diffusers_folder(params, self.cfg, cin, cout, out)


def child(mode: str, model: str, src: str, out: str) -> None:
    """One measured conversion; prints a JSON line."""
    ad = _Adapter(model, src)
    res: dict = {"mode": mode}
    if mode.startswith("to_torch"):
        params = ad.load()
        res["params_bytes"] = int(sum(x.nbytes for x in rb.flatten(params).values()))
    _reset_peak()
    floor = _status("VmRSS")
    t0 = time.perf_counter()
    if mode == "to_flax":
        params = ad.load()
    elif mode == "to_flax_mmap":
        params = rb.stream_to_flax(ad.book, safetensors_io.SafetensorsReader(src), ad.template)
    elif mode == "to_flax_naive":
        params = ad.book.to_flax(load_file(ad.weights), ad.template)
    elif mode == "to_torch":
        ad.save(params, out)
    elif mode == "to_torch_naive":
        os.makedirs(out, exist_ok=True)
        save_file(ad.book.to_torch(params), os.path.join(out, "diffusion_pytorch_model.safetensors"),
                  metadata={"format": "pt"})
    else:
        raise ValueError(mode)
    res["seconds"] = time.perf_counter() - t0
    res["floor"] = floor
    res["peak"] = _peak()
    print(json.dumps(res), flush=True)


def _run_child(mode: str, model: str, src: str, out: str) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    p = subprocess.run([sys.executable, __file__, "--child", mode, "--model", model, "--src", src, "--out", out],
                       env=env,
                       capture_output=True, text=True, check=False)
    if p.returncode:
        raise RuntimeError(f"bench/convert.py child {mode} failed:\n{p.stderr[-4000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def _write_random(path: str, config: dict, specs: dict) -> tuple[str, int]:
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    rng = np.random.default_rng(0)
    file = os.path.join(path, vae_convert.WEIGHTS_FILE)
    tensors = ((k, rng.standard_normal(s, np.float32)) for k, (s, _) in specs.items())
    safetensors_io.write_safetensors(file, specs, tensors, metadata={"format": "pt"})
    return file, sum(int(np.prod(s)) * 4 for s, _ in specs.values())


def make_vae_checkpoint(path: str, gb: float) -> tuple[str, int]:
    """A random Wan 2.1-layout VAE folder of about `gb` GB (base width enlarged from 96)."""

    def size(base_dim: int) -> int:
        specs = vae_convert.torch_specs(vae_convert.template(wan_vae.WanVAEConfig(base_dim=base_dim)))
        return sum(int(np.prod(s)) * 4 for s, _ in specs.values())

    per = size(96) / 96**2  # parameters grow with the square of the width
    base = max(8, int(round((gb * GB / per) ** 0.5 / 8)) * 8)
    cfg = wan_vae.WanVAEConfig(base_dim=base, latents_mean=tuple([0.0] * 16), latents_std=tuple([1.0] * 16))
    return _write_random(path, vae_convert.diffusers_config(cfg), vae_convert.torch_specs(vae_convert.template(cfg)))


def make_dit_checkpoint(path: str, gb: float) -> tuple[str, int]:
    """A random WanTransformer3DModel folder with Wan2.1-T2V-1.3B's widths and as many blocks as reach `gb` GB."""

    def specs(layers: int):
        cfg = dit_lib.DiTConfig(dim=1536, num_layers=layers, num_heads=12, ffn_dim=8960, text_dim=4096, freq_dim=256)
        flat = rb.flatten(dit_convert.template(cfg, 16, 16))
        moves = dit_convert.rulebook(True).plan(flat, None, "flax -> torch")
        return cfg, {m.torch_key: (m.torch_shape, np.dtype(np.float32)) for m in moves}

    def size(sp) -> int:
        return sum(int(np.prod(s)) * 4 for s, _ in sp.values())

    one, two = size(specs(1)[1]), size(specs(2)[1])
    layers = max(1, int(round((gb * GB - (2 * one - two)) / (two - one))))
    cfg, sp = specs(layers)
    return _write_random(path, dit_convert.diffusers_config(cfg, 16, 16), sp)


def same_tensors(a: str, b: str) -> bool:
    """Every tensor of safetensors files `a` and `b` equal byte for byte (read one at a time)."""
    ra, rb_ = safetensors_io.PreadReader(a), safetensors_io.PreadReader(b)
    if set(ra) != set(rb_):
        return False
    return all(ra[k].dtype == rb_[k].dtype and ra[k].tobytes() == rb_[k].tobytes() for k in ra)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", type=float, default=1.0)
    ap.add_argument("--model", choices=("vae", "dit"), default="vae",
                    help="vae: Wan VAE, widened; dit: WanTransformer3DModel at 1.3B widths, fewer blocks")
    ap.add_argument("--workdir", default="/tmp/ttm_convert_bench")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--child")
    ap.add_argument("--src")
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.child:
        child(args.child, args.model, args.src, args.out)
        return
    src = os.path.join(args.workdir, "src")
    t0 = time.perf_counter()
    file, nbytes = (make_vae_checkpoint if args.model == "vae" else make_dit_checkpoint)(src, args.gb)
    print(f"checkpoint: {file}  {os.path.getsize(file) / GB:.3f} GB on disk, {nbytes / GB:.3f} GB of tensors "
          f"(written in {time.perf_counter() - t0:.1f}s)")
    rows = []
    for mode in ("to_flax", "to_flax_mmap", "to_flax_naive", "to_torch", "to_torch_naive"):
        out = os.path.join(args.workdir, mode)
        r = _run_child(mode, args.model, src, out)
        extra = r["peak"] - r["floor"]
        r["ratio"] = extra / nbytes
        rows.append(r)
        note = ""
        if mode.startswith("to_torch"):
            ok = same_tensors(file, os.path.join(out, "diffusion_pytorch_model.safetensors"))
            note = f"  round trip byte-identical: {ok}"
            if not ok:
                raise SystemExit(f"{mode}: the written checkpoint differs from the source")
        print(f"{mode:15s} peak RSS over the floor: {r['ratio']:.2f}x checkpoint ({extra / GB:.2f} GB; floor "
              f"{r['floor'] / GB:.2f} GB; {r['seconds']:.1f}s){note}", flush=True)
        shutil.rmtree(out, ignore_errors=True)
    by = {r["mode"]: r["ratio"] for r in rows}
    print(f"torch -> flax: streamed pread {by['to_flax']:.2f}x vs memory map {by['to_flax_mmap']:.2f}x vs naive "
          f"load_file {by['to_flax_naive']:.2f}x of the checkpoint")
    print(f"flax -> torch (params already in memory, extra peak): streamed writer {by['to_torch']:.2f}x vs naive "
          f"save_file {by['to_torch_naive']:.2f}x of the checkpoint")
    if not args.keep:
        shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
