"""The prepared-record format: one training clip per ArrayRecord record, plus the folder's manifest.

A record is self-describing bytes, readable without TensorFlow:

    b"TTMR" | version u8 | header length u32 (little endian) | header (JSON) | payload

The header maps each array field to `{dtype, shape, codec, offset, nbytes}` (offset into the payload) and holds the
text fields inline (`meta`). Codecs: `raw`; `zlib` (the trajectory: mostly black, shrinks ~20x); `packbits` (bool
masks, 8 per byte). Arrays are decoded with `np.frombuffer` (no copy for `raw`).

Fields of a record (shapes of one clip; T = data.num_frames, K = data.max_objects):

    video            uint8   [T, H, W, 3]
    trajectory       uint8   [T, H, W, 3]
    object_masks     bool    [T, H, W, K]
    frame_indices    int32   [T]
    mask_frame_indices int32 [T]        (when the example has it)
    video_latent     float32 [T', H', W', C]   only with cached latents
    trajectory_latent float32 [T', H', W', C]  only with cached latents
    meta: caption, motion_prompt, local_prompts [K], num_objects, video_id, masklet_keys [K], clip

A prepared folder holds `records-XXXXX.array_record` shards (one per chunk of videos), `records-XXXXX.json` (that
chunk's done-marker and statistics), `prepare.json` (the settings it was made with) and `manifest.json` (written last:
the shards in order, record counts, skip counts).
"""

from __future__ import annotations

import json
import os
import socket
import struct
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

MAGIC = b"TTMR"
VERSION = 1
MANIFEST = "manifest.json"
SPEC = "prepare.json"
# field -> codec; fields not listed are stored raw
CODECS = {"trajectory": "zlib", "object_masks": "packbits"}
ARRAY_FIELDS = ("video", "trajectory", "object_masks", "frame_indices", "mask_frame_indices", "video_latent",
                "trajectory_latent")
META_FIELDS = ("caption", "motion_prompt", "local_prompts", "num_objects", "video_id", "masklet_keys", "clip")


class RecordError(ValueError):
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
        if name.endswith("_latent"):
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


TMP_MARK = ".tmp."


def tmp_name(path: str) -> str:
    """A temporary name for `path` unique to this host and process: `path.tmp.<host>-<pid>`."""
    host = socket.gethostname().replace(".", "_").replace("-", "_")
    return f"{path}{TMP_MARK}{host}-{os.getpid()}"


def is_stale_tmp(filename: str) -> bool:
    """True for a temporary file left by a dead process of this host (others' are never judged stale here)."""
    _, sep, tag = filename.rpartition(TMP_MARK)
    host, _, pid = tag.rpartition("-")
    if not sep or not pid.isdigit() or host != socket.gethostname().replace(".", "_").replace("-", "_"):
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def write_json_atomic(path: str, obj: Any) -> None:
    tmp = tmp_name(path)
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def read_json(path: str) -> Any:
    with open(path) as f:
        return json.load(f)


class ShardWriter:
    """Writes records to `path` through a temporary file that is renamed into place by `commit()`: a reader (or a
    resumed preparation) never sees a partial shard."""

    def __init__(self, path: str):
        self.path = path
        self.tmp = tmp_name(path)
        # group_size:1: each record its own chunk, for cheap random access by Grain
        self._writer = ArrayRecordWriter(self.tmp, "group_size:1")
        self.count = 0

    def write(self, record: bytes) -> None:
        self._writer.write(record)
        self.count += 1

    def commit(self) -> None:
        self._writer.close()
        os.replace(self.tmp, self.path)


def read_shard(path: str) -> list[bytes]:
    """All records of one shard, in order (for tests and inspection; training reads through Grain)."""
    r = ArrayRecordReader(path)
    try:
        return [r.read() for _ in range(r.num_records())]
    finally:
        r.close()


def load_manifest(folder: str) -> dict:
    """The manifest of a prepared folder; raises `RecordError` naming the fix if the folder is not complete."""
    path = os.path.join(folder, MANIFEST)
    if not os.path.exists(path):
        raise RecordError(f"{path}: no manifest, so {folder} is not a finished preparation; run (or resume) "
                          f"`python -m ttm_jax.data.prepare --out={folder} ...`, or fix config.data.prepared_path")
    m = read_json(path)
    if m.get("version") != VERSION:
        raise RecordError(f"{path}: record version {m.get('version')}, this code reads {VERSION}; prepare again "
                          f"into a new folder")
    return m


def shard_paths(folder: str, manifest: Mapping[str, Any] | None = None) -> list[str]:
    """The shard files of a prepared folder in record order (empty shards left out)."""
    manifest = manifest or load_manifest(folder)
    paths = [os.path.join(folder, s["shard"]) for s in manifest["shards"] if s["num_records"] > 0]
    for p in paths:
        if not os.path.exists(p):
            raise RecordError(f"{p}: listed in {os.path.join(folder, MANIFEST)} but missing; resume "
                              f"`python -m ttm_jax.data.prepare --out={folder}` to rewrite it")
    return paths
