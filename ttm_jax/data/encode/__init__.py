"""Cached latents and text embeddings: a prepared folder -> the same records plus what the frozen encoders make of
them (the library; the command line is `ttm_jax/data/encode/__main__.py`).

    python -m ttm_jax.data.encode --prepared=IN --out=OUT --config=configs/stage2.py[:variant] [--batch_size=N]
        [--records_per_shard=64]

A JAX program run like training: one process per host (`jax.distributed` when `config.mesh` / the environment say
so, `mesh.initialize_distributed`); each process encodes in batches split over its *local* devices (a mesh of
`fsdp` = local devices: the text encoder's parameters are sharded over them by the training rules, the batch split
over them), with no collective between processes.

Records are numbered in the order of IN's manifest; output shard j (`records-j.array_record`) holds records
`[j S, (j+1) S)` (S = `records_per_shard`), and process p encodes the shards j with `j % process_count == p`. Every
output record is the input record (same `video_id`, `clip`, pixels, masks, prompts) plus:

    video_latent, trajectory_latent   float32 [T', H', W', C]   the configured autoencoder (the Wan VAE in time chunks)
    caption_tokens/_mask [Lc], motion_tokens/_mask [Lc], local_tokens/_mask [K+1, Lp]   as the loader tokenizes
    caption_embedding, motion_embedding [n, d], local_embedding [K+1, n, d]   the text encoder (padding zeroed, cut
                                                                              after the last real token)

Resumable: a shard is written under a temporary name and renamed (`records.ShardWriter`), then its marker
`records-j.json`; a re-run with the same arguments redoes only shards without a marker (a killed run's partial shard
is redone). `encode.json` pins the settings; `empty_text.npz` holds the empty prompt's embeddings (what dropped text
becomes in training: `assembly.frozen.init_frozen` reads it when `config.data.cached`); `manifest.json` (the loader's
entry, with `latents` = the autoencoder config and `text_embeddings` = the text encoder config) is written by the
process that finds every marker present. A progress line per shard gives clips/s. Paths go through `etils.epath`
(`gs://` works).

The encoders are a parameter (`Encoders`): they are assembled above the data layer; the command line and tests pass
`assembly.frozen.make_encoders(config, mesh)`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from array_record.python.array_record_module import ArrayRecordReader
from etils import epath

from ttm_jax import storage
from ttm_jax.data import loader, records

SPEC = "encode.json"
EMPTY_TEXT = "empty_text.npz"
EMPTY_KEYS = ("empty_context", "empty_local_context", "empty_local_mask")
LATENT_FIELDS = ("video_latent", "trajectory_latent")


class EncodeInterrupted(RuntimeError):
    """Raised by the `interrupt_at_shard` test hook, in the middle of a shard (its temporary file stays behind)."""


@dataclasses.dataclass
class Encoders:
    """The frozen encoders of a run, on a mesh of this process' devices.

    latents: `uint8 [B, T, H, W, 3] -> float32 [B, T', H', W', C]` (the autoencoder's `encode` of the pixels in
      [-1, 1]);
    text: `(ids int32 [B, L], mask bool [B, L]) -> float32 [B, L, d]`, padding positions zero (the stage's
      `inputs.encode_text`);
    tokenizer: `encode(texts, max_length) -> (ids, mask)` (the loader's tokenization);
    empty: the empty prompt's `empty_context [1, Lc, d]`, `empty_local_context [1, Lp, d]`, `empty_local_mask [1, Lp]`;
    mesh: the devices a batch is split over (its first dimension, over every mesh axis).
    """

    latents: Callable[[jax.Array], jax.Array]
    text: Callable[[jax.Array, jax.Array], jax.Array]
    tokenizer: Any
    empty: dict[str, Any]
    mesh: jax.sharding.Mesh


@dataclasses.dataclass
class Summary:
    """What one process did: shards and records it encoded, shards already done, clips per second, and whether
    the folder is complete (its manifest written)."""

    out: str
    shards_done: int
    shards_skipped: int
    records: int
    clips_per_s: float
    complete: bool


def shard_name(j: int) -> str:
    return f"records-{j:05d}.array_record"


def _marker(out: str, j: int) -> str:
    return os.path.join(out, f"records-{j:05d}.json")


def _index(prepared: str, manifest: dict) -> list[tuple[str, int]]:
    """(shard path, record number in it) of every record, in manifest order."""
    out = []
    for s in manifest["shards"]:
        out.extend((os.path.join(prepared, s["shard"]), i) for i in range(int(s["num_records"])))
    return out


class _Reader:
    """Random access to the input shards (one open reader per shard; a `gs://` shard is first copied to a local
    temporary file, since ArrayRecord reads local files)."""

    def __init__(self):
        self._readers: dict[str, ArrayRecordReader] = {}
        self._local: dict[str, str] = {}

    def read(self, path: str, i: int) -> bytes:
        if path not in self._readers:
            local = path
            if storage.is_remote(path):
                fd, local = tempfile.mkstemp(suffix=".array_record")
                os.close(fd)
                epath.Path(path).copy(epath.Path(local), overwrite=True)
                self._local[path] = local
            self._readers[path] = ArrayRecordReader(local)
        return self._readers[path].read([i])[0]

    def release(self, keep: set[str] | frozenset = frozenset()) -> None:
        """Closes the readers (and deletes the local copies) of shards not in `keep`."""
        for path in [p for p in self._readers if p not in keep]:
            self._readers.pop(path).close()
            local = self._local.pop(path, None)
            if local is not None:
                os.remove(local)

    def close(self):
        self.release()


def _put(encoders: Encoders, x: np.ndarray) -> tuple[jax.Array, int]:
    """Host rows -> a device array split over the mesh (rows padded by repeating the last to a multiple of the
    device count); returns it and the real row count."""
    n, d = x.shape[0], encoders.mesh.size
    pad = -n % d
    if pad:
        x = np.concatenate([x, np.repeat(x[-1:], pad, axis=0)])
    spec = jax.sharding.PartitionSpec(tuple(encoders.mesh.axis_names), *([None] * (x.ndim - 1)))
    return jax.device_put(x, jax.sharding.NamedSharding(encoders.mesh, spec)), n


def _dispatch(fn: Callable, encoders: Encoders, *arrays: np.ndarray) -> tuple[jax.Array, int]:
    """`fn` on the rows split over the devices, dispatched (not waited for); returns the result and the row count."""
    placed = [_put(encoders, a) for a in arrays]
    return fn(*(p for p, _ in placed)), placed[0][1]


def _fetch(result: tuple[jax.Array, int]) -> np.ndarray:
    out, n = result
    return np.asarray(jax.device_get(out), np.float32)[:n]


def encode_batch(encoders: Encoders, config: ml_collections.ConfigDict, recs: Sequence[dict], *,
                 pad_to: int = 0) -> list[dict]:
    """Decoded records -> the same records with latents, tokens, masks and (trimmed) text embeddings. `pad_to`:
    encode at least this many rows (the last record repeated, its copies dropped), so that a short last batch has the
    shapes of the others (one compilation). The four encoder calls are dispatched before any result is fetched."""
    t = config.text_encoder
    out = [dict(r) for r in recs]
    recs = list(recs) + [recs[-1]] * max(0, pad_to - len(recs))
    lat = {key: _dispatch(encoders.latents, encoders, np.stack([r[key] for r in recs]))
           for key in ("video", "trajectory")}
    toks = [loader.tokenize_prompts(encoders.tokenizer, r["caption"], r["motion_prompt"], r["local_prompts"],
                                    max_length=int(t.max_length), local_max_length=int(t.local_max_length))
            for r in recs]
    b = len(recs)
    ids = np.concatenate([np.stack([x["caption_tokens"] for x in toks]), np.stack([x["motion_tokens"] for x in toks])])
    mask = np.concatenate([np.stack([x["caption_mask"] for x in toks]), np.stack([x["motion_mask"] for x in toks])])
    emb = _dispatch(encoders.text, encoders, ids, mask)
    lt = np.stack([x["local_tokens"] for x in toks])  # [B, K+1, Lp]
    lm = np.stack([x["local_mask"] for x in toks])
    s, lp = lt.shape[1], lt.shape[2]
    lemb = _dispatch(encoders.text, encoders, lt.reshape(b * s, lp), lm.reshape(b * s, lp))
    for key, res in lat.items():
        for o, z in zip(out, _fetch(res), strict=False):
            o[f"{key}_latent"] = z
    emb, lemb = _fetch(emb), _fetch(lemb).reshape(b, s, lp, -1)
    for i, (o, x) in enumerate(zip(out, toks, strict=False)):
        o.update(x)
        o["caption_embedding"] = records.trim_embedding(emb[i], x["caption_mask"])
        o["motion_embedding"] = records.trim_embedding(emb[b + i], x["motion_mask"])
        o["local_embedding"] = records.trim_embedding(lemb[i], x["local_mask"])
    return out


def _write_npz(path: str, arrays: dict[str, np.ndarray]) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    storage.write_bytes_atomic(path, buf.getvalue())


def read_empty_text(folder: str) -> dict[str, np.ndarray]:
    """The empty prompt's embeddings an encoded folder holds (`EMPTY_KEYS`)."""
    path = os.path.join(folder, EMPTY_TEXT)
    if not epath.Path(path).exists():
        raise records.RecordError(f"{path}: missing, so {folder} is not a folder of cached text embeddings; run "
                                  f"`python -m ttm_jax.data.encode --prepared=<prepared folder> --out={folder} "
                                  f"--config=...`, or set config.data.cached=False")
    with np.load(io.BytesIO(epath.Path(path).read_bytes())) as z:
        return {k: np.asarray(z[k]) for k in EMPTY_KEYS}


def _progress(line: str) -> None:
    logging.info("%s", line)
    print(line, file=sys.stderr, flush=True)


def encode(prepared: str, out: str, config: ml_collections.ConfigDict, encoders: Encoders, *,
           batch_size: int | None = None, records_per_shard: int = 64, process_index: int | None = None,
           process_count: int | None = None, interrupt_at_shard: int | None = None) -> Summary:
    """Encodes (or resumes encoding) this process' share of `prepared` into `out`; see the module docstring.

    `batch_size`: clips per encoder call (default: the mesh's device count); `process_index` / `process_count`:
    default `jax.process_index()` / `jax.process_count()`. `interrupt_at_shard`: the test hook, raise
    `EncodeInterrupted` after the first record of this run's shard number N (counting from 0), leaving its
    temporary file behind as a kill would.
    """
    if records_per_shard < 1:
        raise ValueError(f"encode: --records_per_shard={records_per_shard} must be >= 1")
    p = jax.process_index() if process_index is None else int(process_index)
    n_proc = jax.process_count() if process_count is None else int(process_count)
    batch = int(batch_size or encoders.mesh.size)
    manifest = records.load_manifest(prepared)
    index = _index(prepared, manifest)
    if not index:
        raise ValueError(f"{os.path.join(prepared, records.MANIFEST)}: no records to encode; check --prepared")
    out_path = epath.Path(out)
    out_path.mkdir(parents=True, exist_ok=True)
    num_shards = math.ceil(len(index) / records_per_shard)
    spec = {
        "version": records.VERSION, "prepared": str(prepared), "num_records": len(index),
        "prepared_sha256": hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest(),
        "records_per_shard": records_per_shard, "autoencoder": config.autoencoder.to_dict(),
        **loader.text_settings(config),
    }
    spec_path = os.path.join(out, SPEC)
    if epath.Path(spec_path).exists():
        old = storage.read_json(spec_path)
        # the input's path may be spelled differently by another host or run: its manifest's hash decides
        diff = sorted(k for k in set(old) | set(spec) if k != "prepared" and old.get(k) != spec.get(k))
        if diff:
            raise ValueError(f"{spec_path}: {out} was encoded with other settings ({', '.join(diff)} differ); resume "
                             f"with the same --prepared/--config/--records_per_shard, or use a new --out")
    else:
        storage.write_json_atomic(spec_path, spec)
    if p == 0 and not epath.Path(os.path.join(out, EMPTY_TEXT)).exists():
        _write_npz(os.path.join(out, EMPTY_TEXT), {k: np.asarray(jax.device_get(encoders.empty[k]))
                                                   for k in EMPTY_KEYS})
    mine = [j for j in range(num_shards) if j % n_proc == p]
    todo = [j for j in mine if not epath.Path(_marker(out, j)).exists()]
    storage.remove_stale_tmp(out)
    if len(todo) < len(mine):
        _progress(f"encode: process {p}/{n_proc}: resuming {out}: {len(mine) - len(todo)} of {len(mine)} shards "
                  f"already done")
    reader = _Reader()
    start, done_records = time.perf_counter(), 0
    try:
        for k, j in enumerate(todo):
            rows = index[j * records_per_shard:(j + 1) * records_per_shard]
            writer = records.ShardWriter(os.path.join(out, shard_name(j)))
            ids = []
            for b0 in range(0, len(rows), batch):
                recs = [records.decode(reader.read(path, i)) for path, i in rows[b0:b0 + batch]]
                for r in encode_batch(encoders, config, recs, pad_to=batch):
                    writer.write(records.encode(r))
                    ids.append(f"{r['video_id']}/{r.get('clip', 0)}")
                    if interrupt_at_shard == k:
                        raise EncodeInterrupted(f"encode: test hook: interrupted in shard {j}")
            writer.commit()
            video_ids = list(dict.fromkeys(i.rsplit("/", 1)[0] for i in ids))
            storage.write_json_atomic(_marker(out, j), {"shard": shard_name(j), "num_records": writer.count,
                                                        "record_ids": ids, "video_ids": video_ids})
            nxt = todo[k + 1] if k + 1 < len(todo) else None
            reader.release({path for path, _ in index[nxt * records_per_shard:(nxt + 1) * records_per_shard]}
                           if nxt is not None else frozenset())
            done_records += writer.count
            rate = done_records / max(time.perf_counter() - start, 1e-9)
            _progress(f"encode: process {p}/{n_proc}: shard {j} ({k + 1}/{len(todo)} to do): {done_records} clips, "
                      f"{rate:.2f} clips/s")
    finally:
        reader.close()
    complete = write_manifest(prepared, out, config, manifest, num_shards)
    return Summary(out, len(todo), len(mine) - len(todo), done_records,
                   done_records / max(time.perf_counter() - start, 1e-9), complete)


def write_manifest(prepared: str, out: str, config: ml_collections.ConfigDict, manifest: dict,
                   num_shards: int) -> bool:
    """Writes `out`'s manifest when every shard has its marker (whichever process finishes last); returns whether
    the folder is complete."""
    if not all(epath.Path(_marker(out, j)).exists() for j in range(num_shards)):
        return False
    shards, total = [], 0
    for j in range(num_shards):
        stats = storage.read_json(_marker(out, j))
        shards.append({"shard": stats["shard"], "num_records": stats["num_records"], "video_ids": stats["video_ids"]})
        total += stats["num_records"]
    m = {k: v for k, v in manifest.items() if k not in ("shards", "num_records", "latents", "file")}
    m.update({"version": records.VERSION, "num_records": total, "shards": shards, "encoded_from": str(prepared),
              "latents": config.autoencoder.to_dict(), "text_embeddings": loader.text_settings(config)})
    storage.write_json_atomic(os.path.join(out, records.MANIFEST), m)
    return True
