"""Preparation: SA-V videos + captions -> ArrayRecord shards of fixed-size training clips (the library; the command
line is `ttm_jax/data/prepare/__main__.py`).

    python -m ttm_jax.data.prepare --sav=PATH --captions=JSONL --out=DIR [--config=configs/stage2.py[:variant]]
        [--workers=N] [--chunk_size=8] [--clips_per_video=1] [--seed=0] [--latents] [--format=records|tfds]

Output goes through `etils.epath` (`--out=gs://bucket/prepared` works: shards are written locally and uploaded whole,
JSON files in one write). Videos (sorted by id) are split into chunks of `chunk_size`; chunk c becomes
`records-c.array_record` (written to a temporary name, then renamed) and then `records-c.json` (its done-marker with
statistics). A killed run, re-run with the same arguments, redoes only the chunks without a marker; since every clip
is a pure function of (seed, video id, clip number) (`clips.clip_seed`), the result is the same records as an
uninterrupted run: none duplicated, none missing. `prepare.json` pins the settings (`clips.data_settings` of the
config's data section, seed, video ids): resuming with different ones is an error. `manifest.json` is written last.
The run ends with `videos: N ok, M skipped (reason=count, ...)`; every skipped video's message (its file, what is
wrong, the fix) is logged, kept in its chunk's marker and in the manifest (`skipped_videos`), and printed by the
command line.

`--format=tfds` builds the TFDS dataset `sav_clips` (`ttm_jax/data/tfds_sav.py`, array_record, the same clips for
the same --seed/--clips_per_video) with --out as its data_dir, instead of this module's folder.

`--latents` (`prepare(..., latents=True, make_autoencoder=...)`) also stores the clip's VAE latents (`video_latent`,
`trajectory_latent`, float32 `[T', H', W', C]`, from `make_autoencoder(config.autoencoder).encode`) so training reads
latents instead of pixels. The factory is a parameter because autoencoders are assembled above the data layer: the
command line passes the registry's; a library caller passes its own (a module-level function, picklable for
`workers > 1`).
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import hashlib
import logging
import multiprocessing
import os
import signal
from collections.abc import Callable, Sequence
from typing import Any

import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from ttm_jax import cli, storage
from ttm_jax.data import captions as captions_lib
from ttm_jax.data import clips, records, sav
from ttm_jax.data.video_io import SkipVideo

# Test hook: SIGKILL this process in the middle of writing chunk number N (counting committed chunks of this run), to
# prove that a killed preparation resumes without duplicated or missing records.
KILL_ENV = "TTM_PREPARE_KILL_AT_CHUNK"

# `make_autoencoder(config.autoencoder) -> autoencoder` with `encode(video [B, T, H, W, 3] in [-1, 1]) ->
# [B, T', H', W', C]`; a module-level function, so that worker processes can unpickle it.
AutoencoderFactory = Callable[[ml_collections.ConfigDict], Any]


@dataclasses.dataclass
class Summary:
    """What a preparation did: videos with at least one clip, skipped videos by reason, records written, and each
    skipped video's message (`"<file>: <detail> [<reason>]"`, in video order)."""

    videos_ok: int
    skipped: dict[str, int]
    num_records: int
    out: str
    skipped_videos: list[str] = dataclasses.field(default_factory=list)

    @property
    def videos_skipped(self) -> int:
        """All skipped videos, whatever the reason."""
        return sum(self.skipped.values())

    def line(self) -> str:
        """`videos: N ok, M skipped (reason=count, ...)`, the line a run ends with."""
        reasons = ", ".join(f"{r}={n}" for r, n in sorted(self.skipped.items()))
        return f"videos: {self.videos_ok} ok, {self.videos_skipped} skipped" + (f" ({reasons})" if reasons else "")


def shard_name(chunk: int) -> str:
    """The shard file of chunk number `chunk`."""
    return f"records-{chunk:05d}.array_record"


def _marker(out: str, chunk: int) -> str:
    return os.path.join(out, f"records-{chunk:05d}.json")


def _encode_latents(autoencoder: Any, examples: list[dict]) -> None:
    """Adds `video_latent` / `trajectory_latent` float32 [T', H', W', C] to each example (one batched call)."""
    for key in ("video", "trajectory"):
        pixels = np.stack([e[key] for e in examples]).astype(np.float32) / 127.5 - 1.0  # [B, T, H, W, 3] in [-1, 1]
        lat = np.asarray(autoencoder.encode(jnp.asarray(pixels)), np.float32)
        for e, z in zip(examples, lat, strict=True):
            e[f"{key}_latent"] = z


_AUTOENCODERS: dict[tuple[AutoencoderFactory, str], Any] = {}


def _autoencoder(make_autoencoder: AutoencoderFactory, ae_config: ml_collections.ConfigDict) -> Any:
    """One autoencoder per process, factory and config (a real VAE loads its weights once, not once per chunk)."""
    key = (make_autoencoder, ae_config.to_json(sort_keys=True))
    if key not in _AUTOENCODERS:
        _AUTOENCODERS[key] = make_autoencoder(ae_config)
    return _AUTOENCODERS[key]


def process_chunk(chunk: int, refs: Sequence[sav.VideoRef], captions: dict, config: ml_collections.ConfigDict,
                  out: str, seed: int, clips_per_video: int, make_autoencoder: AutoencoderFactory | None = None,
                  kill: bool = False) -> dict:
    """Makes the clips of one chunk of videos and commits its shard and marker; returns the chunk's statistics.

    `make_autoencoder`: None, or the factory whose autoencoder adds each clip's latents (`video_latent`,
    `trajectory_latent` float32 `[T', H', W', C]`). `kill`: the test hook (`KILL_ENV`).
    """
    counter = sav.SkipCounter(f"prepare chunk {chunk}")
    writer = records.ShardWriter(os.path.join(out, shard_name(chunk)))
    autoencoder = None if make_autoencoder is None else _autoencoder(make_autoencoder, config.autoencoder)
    ok, video_ids = 0, []
    for ref in refs:
        try:
            entry = captions_lib.lookup(captions, ref.video_id, file=ref.video.name,
                                        missing=config.data.get("missing_captions", "skip"))
            examples = []
            for c in range(clips_per_video):
                e = clips.make_example(ref, entry, config.data, clips.clip_seed(seed, ref.video_id, c))
                e["clip"] = c
                examples.append(e)
        except SkipVideo as e:
            counter.add(e)
            continue
        if autoencoder is not None:
            _encode_latents(autoencoder, examples)
        for e in examples:
            writer.write(records.encode(e))
            if kill:  # the test hook: die for real with a half-written shard on disk
                os.kill(os.getpid(), signal.SIGKILL)
        ok += 1
        video_ids.append(ref.video_id)
    writer.commit()
    stats = {"chunk": chunk, "shard": shard_name(chunk), "num_records": writer.count, "videos_ok": ok,
             "video_ids": video_ids, "skipped": dict(counter.counts), "skipped_videos": list(counter.messages),
             "num_videos": len(refs)}
    storage.write_json_atomic(_marker(out, chunk), stats)
    return stats


def prepare(sav_path: str | Sequence[str], captions_path: str, out: str, config: ml_collections.ConfigDict, *,
            workers: int = 1, chunk_size: int = 8, clips_per_video: int = 1, seed: int = 0,
            latents: bool = False, make_autoencoder: AutoencoderFactory | None = None) -> Summary:
    """Prepares (or resumes preparing) `out`; returns the `Summary`. See the module docstring.

    Records hold `video`/`trajectory` uint8 `[T, H, W, 3]`, `object_masks` bool `[T, H, W, K]`, ... (the example of
    `clips.make_example`) and, with `latents`, `video_latent`/`trajectory_latent` float32 `[T', H', W', C]` from
    `make_autoencoder(config.autoencoder)` (required then; None: no latents possible).
    """
    if chunk_size < 1 or clips_per_video < 1:
        raise ValueError(f"prepare: --chunk_size={chunk_size} and --clips_per_video={clips_per_video} must be >= 1")
    if latents and make_autoencoder is None:
        raise ValueError("prepare: latents=True needs make_autoencoder, the factory `make_autoencoder("
                         "config.autoencoder)` of the latents (a module-level function; the command line "
                         "`python -m ttm_jax.data.prepare --latents` passes the registry's)")
    find_counter = sav.SkipCounter("prepare")
    if isinstance(sav_path, str) and "," in sav_path:
        sav_path = sav_path.split(",")
    refs = sav.find_videos(sav_path, config.data.annotation, counter=find_counter)
    if not refs:
        raise cli.MissingInput(f"prepare: no SA-V videos with {config.data.annotation} annotations under "
                               f"{sav_path!r} ({find_counter.summary()}); check --sav")
    captions = captions_lib.load_captions(captions_path)  # a bad line fails here, before anything is written
    epath.Path(out).mkdir(parents=True, exist_ok=True)
    spec = {
        "version": records.VERSION, "data": clips.data_settings(config.data), "seed": seed, "chunk_size": chunk_size,
        "clips_per_video": clips_per_video,
        "latents": dict(config.autoencoder.to_dict()) if latents else None,
        "video_ids_sha256": hashlib.sha256("\n".join(r.video_id for r in refs).encode()).hexdigest(),
        "num_videos": len(refs),
    }
    spec_path = os.path.join(out, records.SPEC)
    if epath.Path(spec_path).exists():
        old = storage.read_json(spec_path)
        if old != spec:
            diff = sorted(k for k in set(old) | set(spec) if old.get(k) != spec.get(k))
            raise ValueError(f"{spec_path}: {out} was prepared with other settings ({', '.join(diff)} differ); "
                             f"resume with the same --sav/--config/--seed/--chunk_size/--clips_per_video/--latents, "
                             f"or use a new --out")
    else:
        storage.write_json_atomic(spec_path, spec)
    chunks = [refs[i:i + chunk_size] for i in range(0, len(refs), chunk_size)]
    todo = [c for c in range(len(chunks)) if not epath.Path(_marker(out, c)).exists()]
    if len(todo) < len(chunks):
        logging.info("prepare: resuming %s: %d of %d chunks already done", out, len(chunks) - len(todo), len(chunks))
    storage.remove_stale_tmp(out)
    kill_at = int(os.environ.get(KILL_ENV, "-1"))
    factory = make_autoencoder if latents else None
    args = [(c, chunks[c], {r.video_id: captions[r.video_id] for r in chunks[c] if r.video_id in captions}, config,
             out, seed, clips_per_video, factory) for c in todo]
    if workers <= 1:
        for i, a in enumerate(args):
            process_chunk(*a, kill=(i == kill_at))
    else:
        # spawn: workers may start JAX (latents); forking a process that has JAX threads is unsafe
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            for f in concurrent.futures.as_completed([pool.submit(process_chunk, *a) for a in args]):
                f.result()
    # every chunk has its marker now: the manifest lists the shards in chunk order
    shards, skipped, ok, total = [], collections.Counter(find_counter.counts), 0, 0
    messages = list(find_counter.messages)
    for c in range(len(chunks)):
        stats = storage.read_json(_marker(out, c))
        shards.append({"shard": stats["shard"], "num_records": stats["num_records"], "video_ids": stats["video_ids"]})
        skipped.update(stats["skipped"])
        messages.extend(stats.get("skipped_videos", []))  # markers of older runs have only the counts
        ok += stats["videos_ok"]
        total += stats["num_records"]
    summary = Summary(ok, dict(skipped), total, out, messages)
    storage.write_json_atomic(os.path.join(out, records.MANIFEST), {
        "version": records.VERSION, "data": spec["data"], "latents": spec["latents"], "seed": seed,
        "clips_per_video": clips_per_video, "num_records": total, "videos_ok": ok, "skipped": dict(skipped),
        "skipped_videos": messages, "shards": shards,
    })
    return summary
