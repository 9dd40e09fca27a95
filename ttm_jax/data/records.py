"""The prepared-record format: one training clip per ArrayRecord record, plus the folder's manifest.

A record is self-describing bytes, readable without TensorFlow:

    b"TTMR" | version u8 | header length u32 (little endian) | header (JSON) | payload

The header maps each array field to `{dtype, shape, codec, offset, nbytes}` (offset into the payload) and holds the
text fields inline (`meta`). Codecs: `raw`; `zlib` (the trajectory: mostly black, compresses well); `packbits` (bool
masks, 8 per byte). Arrays are decoded with `np.frombuffer` (no copy for `raw`).

Fields of a record (shapes of one clip; T = data.num_frames, K = data.max_objects):

    video            uint8   [T, H, W, 3]
    trajectory       uint8   [T, H, W, 3]
    object_masks     bool    [T, H, W, K]
    frame_indices    int32   [T]
    mask_frame_indices int32 [T]        (when the example has it)
    video_latent     float32 [T', H', W', C]   only with cached latents
    trajectory_latent float32 [T', H', W', C]  only with cached latents
    caption_tokens / motion_tokens int32 [Lc], caption_mask / motion_mask bool [Lc],
    local_tokens int32 [K+1, Lp], local_mask bool [K+1, Lp]      only with cached text embeddings
    caption_embedding / motion_embedding float32 [n, d], local_embedding float32 [K+1, n, d]
                     only with cached text embeddings (`python -m ttm_jax.data.encode`): the text encoder's output
                     cut after the last real token (n <= Lc or Lp; the rest is padding, zero); `pad_embedding`
                     restores [Lc, d] / [K+1, Lp, d]
    meta: caption, motion_prompt, local_prompts [K], num_objects, video_id, masklet_keys [K], clip

A prepared folder holds `records-XXXXX.array_record` shards (one per chunk of videos), `records-XXXXX.json` (that
chunk's done-marker and statistics), `prepare.json` (the settings it was made with) and `manifest.json` (written last:
the shards in order, record counts, skip counts).
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from array_record.python.array_record_data_source import ArrayRecordDataSource
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter
from etils import epath

from ttm_jax import cli, storage

MAGIC = b"TTMR"
VERSION = 1
MANIFEST = "manifest.json"
SPEC = "prepare.json"
# field -> codec; fields not listed are stored raw
CODECS = {"trajectory": "zlib", "object_masks": "packbits", "caption_mask": "packbits", "motion_mask": "packbits",
          "local_mask": "packbits"}
# the cached text of `python -m ttm_jax.data.encode`: tokens, masks and the text encoder's embeddings
TEXT_FIELDS = ("caption_tokens", "caption_mask", "motion_tokens", "motion_mask", "local_tokens", "local_mask",
               "caption_embedding", "motion_embedding", "local_embedding")
ARRAY_FIELDS = ("video", "trajectory", "object_masks", "frame_indices", "mask_frame_indices", "video_latent",
                "trajectory_latent", *TEXT_FIELDS)
META_FIELDS = ("caption", "motion_prompt", "local_prompts", "num_objects", "video_id", "masklet_keys", "clip")


class RecordError(cli.UserError, ValueError):
    """A record or prepared folder that cannot be read; the message names the file and the fix."""


def _jsonable(v: Any) -> Any:
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


def encode(example: Mapping[str, Any]) -> bytes:
    """A training example (plus optional `video_latent`/`trajectory_latent`) -> record bytes.

    Unknown keys are an error, so a field added upstream is never silently dropped.
    """
    unknown = set(example) - set(ARRAY_FIELDS) - set(META_FIELDS)
    if unknown:
        raise RecordError(f"records.encode: example has fields {sorted(unknown)} the record schema does not know; "
                          f"add them to ARRAY_FIELDS or META_FIELDS in ttm_jax/data/records.py")
    fields, chunks, offset = {}, [], 0
    for name in ARRAY_FIELDS:
        if name not in example:
            continue
        a = np.asarray(example[name])
        if name.endswith("_latent") or name.endswith("_embedding"):
            a = a.astype(np.float32)
        codec = CODECS.get(name, "raw")
        if codec == "packbits":
            if a.dtype != np.bool_:
                raise RecordError(f"records.encode: field {name!r} must be bool for packbits, got {a.dtype}")
            data = np.packbits(a.reshape(-1)).tobytes()
        elif codec == "zlib":
            data = zlib.compress(np.ascontiguousarray(a).tobytes(), 1)
        else:
            data = np.ascontiguousarray(a).tobytes()
        fields[name] = {"dtype": a.dtype.str, "shape": list(a.shape), "codec": codec, "offset": offset,
                        "nbytes": len(data)}
        chunks.append(data)
        offset += len(data)
    meta = {k: _jsonable(example[k]) for k in META_FIELDS if k in example}
    header = json.dumps({"fields": fields, "meta": meta}, sort_keys=True, ensure_ascii=False).encode()
    return b"".join([MAGIC, struct.pack("<BI", VERSION, len(header)), header, *chunks])


def decode(data: bytes, *, fields: Sequence[str] | None = None) -> dict[str, Any]:
    """Record bytes -> dict of numpy arrays and the meta values. `fields`: decode only these arrays (all if None)."""
    if data[:4] != MAGIC:
        raise RecordError("records.decode: not a ttm-jax record (bad magic); the folder was not written by "
                          "`python -m ttm_jax.data.prepare`")
    version, hlen = struct.unpack_from("<BI", data, 4)
    if version != VERSION:
        raise RecordError(f"records.decode: record version {version}, this code reads {VERSION}; re-run "
                          f"`python -m ttm_jax.data.prepare` into a new --out")
    start = 9
    header = json.loads(data[start:start + hlen])
    payload = memoryview(data)[start + hlen:]
    out: dict[str, Any] = dict(header["meta"])
    for name, f in header["fields"].items():
        if fields is not None and name not in fields:
            continue
        buf = payload[f["offset"]:f["offset"] + f["nbytes"]]
        dtype, shape = np.dtype(f["dtype"]), tuple(f["shape"])
        if f["codec"] == "packbits":
            a = np.unpackbits(np.frombuffer(buf, np.uint8), count=int(np.prod(shape))).astype(bool).reshape(shape)
        elif f["codec"] == "zlib":
            a = np.frombuffer(zlib.decompress(buf), dtype).reshape(shape)
        else:
            a = np.frombuffer(buf, dtype).reshape(shape)
        out[name] = a
    return out


# ------------------------------------------------------------------------------------------------ files and folders


# what a refused shard write tells the user: a preparation resumes after its last complete shard
_RESUME = ("the files before it are complete; free space (or make the folder writable), then run the same command "
           "again: it resumes after the last complete shard")


class ShardWriter:
    """Writes records to `path` through a temporary file that is renamed into place by `commit()`: a reader (or a
    resumed preparation) never sees a partial shard. A `gs://` path is written to a local temporary file and
    uploaded by `commit()`."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        if storage.is_remote(self.path):
            fd, self.tmp = tempfile.mkstemp(suffix=".array_record")
            os.close(fd)
        else:
            self.tmp = storage.tmp_name(self.path)
        # group_size:1: each record its own chunk, for cheap random access by Grain
        self._writer = ArrayRecordWriter(self.tmp, "group_size:1")
        self.count = 0

    def write(self, record: bytes) -> None:
        try:
            self._writer.write(record)
        except Exception as e:  # noqa: BLE001 - ArrayRecord reports the OS error in a RuntimeError's text
            self._abandon(e)
            raise
        self.count += 1

    def _abandon(self, error: BaseException) -> None:
        if cli.storage_failure(error) is not None:
            try:
                self._writer.close()
            except Exception:  # noqa: BLE001, S110 - closing a writer the storage refused fails the same way
                pass
            storage.refused(self.path, self.tmp, error, then=_RESUME)

    def commit(self) -> None:
        try:
            self._writer.close()
        except Exception as e:  # noqa: BLE001 - as in write
            storage.refused(self.path, self.tmp, e, then=_RESUME)
            raise
        if storage.is_remote(self.path):
            epath.Path(self.tmp).copy(epath.Path(self.path), overwrite=True)
            os.remove(self.tmp)
        else:
            os.replace(self.tmp, self.path)


def read_shard(path: str | os.PathLike) -> list[bytes]:
    """All records of one shard, in order (for tests and inspection; training reads through Grain)."""
    r = ArrayRecordReader(os.fspath(path))
    try:
        return [r.read() for _ in range(r.num_records())]
    finally:
        r.close()


def load_manifest(folder: str) -> dict:
    """The manifest of a prepared folder; raises `RecordError` naming the fix if the folder is not complete."""
    path = os.path.join(folder, MANIFEST)
    if not epath.Path(path).exists():
        raise RecordError(f"{path}: no manifest, so {folder} is not a finished preparation; run (or resume) "
                          f"`python -m ttm_jax.data.prepare --out={folder} ...`, or fix config.data.prepared_path")
    m = storage.read_json(path)
    if m.get("version") != VERSION:
        raise RecordError(f"{path}: record version {m.get('version')}, this code reads {VERSION}; prepare again "
                          f"into a new folder")
    return m


def shard_paths(folder: str, manifest: Mapping[str, Any] | None = None) -> list[str]:
    """The shard files of a prepared folder in record order (empty shards left out)."""
    manifest = manifest or load_manifest(folder)
    paths = [os.path.join(folder, s["shard"]) for s in manifest["shards"] if s["num_records"] > 0]
    for p in paths:
        if not epath.Path(p).exists():
            raise RecordError(f"{p}: listed in {os.path.join(folder, MANIFEST)} but missing; resume "
                              f"`python -m ttm_jax.data.prepare --out={folder}` to rewrite it")
    return paths


class ShardUnreadable(RecordError):
    """A record of a listed shard cannot be read any more (the file was truncated, replaced or damaged after it was
    prepared); the message names the shard and the record."""

    mid_run = True  # found while training: the run's workdir and log stay (`main` undoes nothing)


class CheckedShards:
    """The records of a prepared folder's shards, in order, as a Grain random-access source (an
    `ArrayRecordDataSource` inside), where a record that cannot be read raises `ShardUnreadable` naming its shard and
    place instead of ArrayRecord's bare `RuntimeError`. Picklable for Grain's worker processes."""

    def __init__(self, folder: str, manifest: Mapping[str, Any] | None = None):
        manifest = manifest or load_manifest(folder)
        self.paths = shard_paths(folder, manifest)
        counts = [int(s["num_records"]) for s in manifest["shards"] if s["num_records"] > 0]
        self.starts = np.cumsum([0, *counts]).tolist()
        self._source = ArrayRecordDataSource(self.paths)

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> bytes:
        try:
            record = self._source[index]
            if not record:  # ArrayRecord reads a record past a cut-off end as b"": a prepared record is never empty
                raise EOFError("it reads as empty: the file was cut short")
            return record
        except Exception as e:  # noqa: BLE001 - any failure to read a listed record means the shard changed
            shard = int(np.searchsorted(self.starts, int(index), side="right")) - 1
            why = " ".join(str(e).split())[:200]
            raise ShardUnreadable(
                f"{self.paths[shard]}: record {int(index) - self.starts[shard]} of the shard (record {int(index)} of "
                f"the folder) cannot be read ({type(e).__name__}: {why}); the file changed or was damaged after it "
                f"was prepared. Restore it, or re-prepare it (delete it and its .json marker, then run prepare again "
                f"with the same flags)") from None

    def __repr__(self) -> str:
        return f"CheckedShards({len(self.paths)} shards, {len(self)} records)"


# ---------------------------------------------------------------------------------------------- cached text fields


def trim_embedding(emb: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """`emb [..., L, d]` cut after the last real token of `mask [..., L]` (over all leading slots): what a record
    stores; everything after it is padding (zero in the text encoder's output as the stage uses it)."""
    real = np.flatnonzero(np.asarray(mask).reshape(-1, mask.shape[-1]).any(0))
    n = int(real[-1]) + 1 if real.size else 0
    return np.ascontiguousarray(np.asarray(emb, np.float32)[..., :n, :])


def pad_embedding(emb: np.ndarray, length: int) -> np.ndarray:
    """A stored embedding `[..., n, d]` back to `[..., length, d]` (zeros after the n stored positions)."""
    n = emb.shape[-2]
    if n > length:
        raise RecordError(f"records: a cached text embedding has {n} positions but the config's text length is "
                          f"{length}; encode again (python -m ttm_jax.data.encode) with this config")
    if n == length:
        return np.asarray(emb)
    pad = [(0, 0)] * (emb.ndim - 2) + [(0, length - n), (0, 0)]
    return np.pad(emb, pad)
