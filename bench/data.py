"""Data throughput against what it feeds, all measured in one run on this machine.

    python bench/data.py [--variants tiny,mid] [--videos 8] [--source 360x640] [--frames 48] [--repeats 3]
        [--batches 8] [--steps 3] [--workdir DIR]

Synthetic SA-V (`ttm_jax.data.synthetic`, `--videos` mp4s of `--source` H x W pixels, `--frames` frames at 24 fps,
in tar shards, with their annotations and captions) is made once; then for each variant's clip shape:

  1. preparation (`prepare.prepare`, one process: read the tar member, decode the clip's frames with PyAV, decode and
     rasterise the masks, select objects, crop + resize, trajectory, record encoding, ArrayRecord write) in clips/s,
     against raw PyAV decoding of the same frames of the same videos (read the member's bytes, `av.open`, decode in
     order up to the clip's last frame, the clip's frames to RGB arrays; nothing else), best of `--repeats`
     interleaved passes each: goal >= 0.5;
  2. the Grain input pipeline (`loader.make_train_iterator` on the prepared folder: read, decode records, tokenize,
     batch; the config's `data.read_threads` / `data.num_workers`) in clips/s, against what the train step consumes
     (`bench/train.py`'s full step on one device: steps/s x batch): goal >= 1;
  3. the cached-latents encoder (`ttm_jax.data.encode` with `assembly.frozen.make_encoders` on a one-device mesh,
     compiled by a first pass, timed on a second) in clips/s per device, against the same consumption per device
     (informational: encoding is done once, training reads the clips every epoch).

One table of ratios at the end. Absolute figures depend on the machine and its load (printed: the load average before
and after); the ratios are measured in the same run.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import io  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

_BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(_BENCH))  # run from a checkout, uninstalled
sys.path.insert(0, _BENCH)  # bench/train.py: the train step's throughput

import av  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
import train as train_bench  # noqa: E402

from ttm_jax import config as config_lib  # noqa: E402
from ttm_jax.assembly import frozen as frozen_lib  # noqa: E402
from ttm_jax.data import encode as encode_lib  # noqa: E402
from ttm_jax.data import loader, prepare, records, sav, synthetic  # noqa: E402


def _log(msg: str) -> None:
    print(msg, flush=True)


def make_sav(out: str, videos: int, height: int, width: int, frames: int) -> str:
    """Synthetic SA-V in `out` (tar shards + captions.jsonl)."""
    t0 = time.perf_counter()
    synthetic.generate(out, videos, seed=0, height=height, width=width, frames=frames, videos_per_shard=4)
    _log(f"synthetic SA-V: {videos} videos {height}x{width}, {frames} frames ({time.perf_counter() - t0:.1f} s)")
    return out


def bench_prepare(sav_dir: str, out: str, config) -> tuple[float, int]:
    """(clips/s, clips) of one-process preparation into `out`."""
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    summary = prepare.prepare(sav_dir, os.path.join(sav_dir, synthetic.CAPTIONS_FILE), out, config, workers=1,
                              chunk_size=4)
    dt = time.perf_counter() - t0
    return summary.num_records / dt, summary.num_records


def raw_decode(data: bytes, wanted: np.ndarray) -> np.ndarray:
    """Plain PyAV: decode frames 0..max(wanted) in order, the wanted ones to RGB uint8 `[len(wanted), H, W, 3]`."""
    want = set(int(i) for i in wanted)
    last, out = max(want), {}
    with av.open(io.BytesIO(data)) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i in want:
                out[i] = frame.to_ndarray(format="rgb24")
            if i >= last:
                break
    return np.stack([out[int(i)] for i in wanted])


def bench_raw(sav_dir: str, prepared: str, repeats: int = 1) -> float:
    """clips/s of raw PyAV decoding of the frames of every prepared clip (`frame_indices`), mp4 bytes read from the
    tar each time (as preparation does)."""
    refs = {r.video_id: r for r in sav.find_videos(sav_dir)}
    m = records.load_manifest(prepared)
    clips = [(r["video_id"], r["frame_indices"])
             for p in records.shard_paths(prepared, m)
             for r in (records.decode(x, fields=("video_id", "frame_indices")) for x in records.read_shard(p))]
    t0 = time.perf_counter()
    for _ in range(repeats):
        for vid, idx in clips:
            frames = raw_decode(refs[vid].video.read_bytes(), idx)
            assert frames.shape[0] == len(idx)
    return repeats * len(clips) / (time.perf_counter() - t0)


def bench_grain(variant: str, prepared: str, batches: int, workdir: str) -> float:
    """clips/s of the Grain train iterator of `variant` on `prepared` (after one warm-up batch)."""
    c = config_lib.build(2, variant)
    c.data.prepared_path = prepared
    it = loader.make_train_iterator(c, process_index=0, process_count=1, workdir=workdir)
    b = next(it)["video"].shape[0]
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * b / (time.perf_counter() - t0)


def bench_encode(config, prepared: str, out: str) -> float:
    """clips/s per device of `data.encode` on a one-device mesh (second pass; the first compiles)."""
    mesh = frozen_lib.encoding_mesh(config, jax.devices()[:1])
    encoders = frozen_lib.make_encoders(config, mesh)
    batch = max(1, min(4, int(config.train.batch_size)))
    rate = 0.0
    for k in range(2):
        dst = f"{out}-{k}"
        shutil.rmtree(dst, ignore_errors=True)
        t0 = time.perf_counter()
        s = encode_lib.encode(prepared, dst, config, encoders, batch_size=batch, records_per_shard=64,
                              process_index=0, process_count=1)
        rate = s.records / (time.perf_counter() - t0)
    return rate / mesh.size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default="tiny,mid")
    ap.add_argument("--videos", type=int, default=8)
    ap.add_argument("--source", default="360x640", help="synthetic SA-V video size, HxW")
    ap.add_argument("--frames", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3, help="preparation and raw decode: best of this many passes")
    ap.add_argument("--batches", type=int, default=8, help="Grain batches timed")
    ap.add_argument("--steps", type=int, default=3, help="train steps timed")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    h, w = (int(v) for v in args.source.lower().split("x"))
    work = args.workdir or tempfile.mkdtemp(prefix="bench_data_")
    load0 = os.getloadavg()
    _log(f"machine: {os.cpu_count()} cores, load average {load0[0]:.2f} / {load0[1]:.2f} / {load0[2]:.2f}; "
         f"jax {jax.__version__} on {jax.devices()[0].platform}")
    sav_dir = make_sav(os.path.join(work, "sav"), args.videos, h, w, args.frames)
    rows = []
    for variant in [v for v in args.variants.split(",") if v]:
        c = config_lib.validate(config_lib.build(2, variant))
        d = c.data
        shape = f"{d.num_frames}x{d.height}x{d.width}"
        prepared = os.path.join(work, f"prepared-{variant}")
        prep = raw = 0.0
        for _ in range(args.repeats):  # interleaved, best of each: both see the same machine
            p, n = bench_prepare(sav_dir, prepared, c)
            prep, raw = max(prep, p), max(raw, bench_raw(sav_dir, prepared))
        _log(f"[{variant} {shape}] prepare {prep:.2f} clips/s ({n} clips), raw PyAV decode {raw:.2f} clips/s "
             f"(best of {args.repeats})")
        grain_rate = bench_grain(variant, prepared, args.batches, os.path.join(work, f"wd-{variant}"))
        step = train_bench.bench_full_step(variant, 2, args.steps)
        consume = step["best"] * step["batch"]  # the train step at its best: the pace the input must keep
        _log(f"[{variant}] grain {grain_rate:.2f} clips/s (read_threads={d.read_threads}, num_workers="
             f"{d.num_workers}); train step {step['best']:.3f} steps/s (best of {args.steps}) x batch "
             f"{step['batch']} = "
             f"{consume:.2f} clips/s")
        enc = bench_encode(c, prepared, os.path.join(work, f"encoded-{variant}"))
        _log(f"[{variant}] encode {enc:.2f} clips/s per device ({c.autoencoder.name} autoencoder, "
             f"{c.text_encoder.get('name', 't5')} text encoder)")
        rows += [(variant, shape, "prepare (1 process) / raw PyAV decode", prep, raw, ">= 0.5"),
                 (variant, shape, "Grain input / train step consumption", grain_rate, consume, ">= 1"),
                 (variant, shape, "encode per device / train consumption per device", enc, consume, "info")]
    load1 = os.getloadavg()
    _log("")
    _log(f"source videos {h}x{w}, {args.frames} frames, {args.videos} videos; load average before {load0[0]:.2f}, "
         f"after {load1[0]:.2f} ({os.cpu_count()} cores)")
    head = f"{'variant':8} {'clip':11} {'measure':50} {'clips/s':>9} {'vs clips/s':>11} {'ratio':>8} {'goal':>7}"
    _log(head)
    _log("-" * len(head))
    for variant, shape, what, a, b, goal in rows:
        _log(f"{variant:8} {shape:11} {what:50} {a:9.2f} {b:11.2f} {a / b:8.2f} {goal:>7}")
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
