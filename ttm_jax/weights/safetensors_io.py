"""Generic `.safetensors` reading and writing on numpy arrays, tensor by tensor (no torch, no `safetensors` package).

A safetensors file is an 8-byte little-endian header length `n`, a JSON header of `n` bytes ({key: {dtype, shape,
data_offsets}}, plus an optional `__metadata__` dict of strings), then the raw tensor bytes. Readers parse only the
headers up front, so a conversion can be planned on `specs` ({key: (shape, numpy dtype)}) before any tensor is read:

    SafetensorsReader(path)       lazy {key: array} over a file, a folder holding one, or a sharded checkpoint
                                  (`*.safetensors.index.json`); each tensor a view of a memory map
    PreadReader(path)             the same, each tensor read with `os.preadv` into a fresh array (resident memory
                                  stays at one tensor: converted pages do not stay mapped)
    MultiFileReader(files)        several files (each a `PreadReader`) as one mapping; keys must not repeat
    write_safetensors(path, specs, tensors, metadata)
                                  streams one file: the header from `specs`, then each tensor at its offset

bfloat16 and float8 tensors come back as `ml_dtypes` arrays.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import ml_dtypes
import numpy as np
from etils import epath

from ttm_jax import cli

Shape = tuple[int, ...]
Spec = tuple[Shape, Any]  # (shape, numpy dtype)

# safetensors dtype name -> numpy dtype (what the readers know)
DTYPES: dict[str, Any] = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2, "I64": np.int64, "I32": np.int32,
    "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
# numpy dtype -> safetensors dtype name (what the writer stores)
NAMES: dict[np.dtype, str] = {
    np.dtype(np.float64): "F64", np.dtype(np.float32): "F32", np.dtype(np.float16): "F16",
    np.dtype(ml_dtypes.bfloat16): "BF16", np.dtype(np.int64): "I64", np.dtype(np.int32): "I32",
}


def _files(path: str | epath.PathLike) -> list[str]:
    """The safetensors files of a file, a folder holding one, or a sharded checkpoint folder."""
    p = epath.Path(path)
    if p.is_dir():
        index = sorted(p.glob("*.safetensors.index.json"))
        files = sorted(p.glob("*.safetensors"))
        if index:
            weight_map = json.loads(index[0].read_text())["weight_map"]
            files = [p / f for f in sorted(set(weight_map.values()))]
        elif len(files) != 1:
            raise cli.MissingInput(
                f"{p}: expected one *.safetensors file or a *.safetensors.index.json, found "
                f"{[f.name for f in files]}; point the path at a checkpoint folder (e.g. model.safetensors)")
    elif p.exists():
        files = [p]
    else:
        raise cli.MissingInput(f"{p}: no such safetensors file or folder")
    return [str(f) for f in files]


class SafetensorsReader(Mapping):
    """Lazy, memory-mapped {key: numpy array} over one local `.safetensors` file, a folder holding one, or a
    sharded checkpoint (`*.safetensors.index.json`); bfloat16 comes back as `ml_dtypes.bfloat16`. Only the headers
    are read up front, so `specs` can plan a conversion before any tensor is touched."""

    def __init__(self, path: str | epath.PathLike):
        self.files = _files(path)
        # key -> (file, shape, dtype, first byte, end byte)
        self._where: dict[str, tuple[str, Shape, Any, int, int]] = {}
        for f in self.files:
            with open(f, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                header = json.loads(fh.read(n))
            for key, info in header.items():
                if key == "__metadata__":
                    continue
                if info["dtype"] not in DTYPES:
                    raise cli.BadInput(f"{f}: tensor {key!r} has dtype {info['dtype']}, which this reader does "
                                       f"not know")
                b, e = info["data_offsets"]
                self._where[key] = (f, tuple(info["shape"]), DTYPES[info["dtype"]], 8 + n + b, 8 + n + e)
        self._maps: dict[str, np.memmap] = {}

    @property
    def specs(self) -> dict[str, Spec]:
        """{key: (shape, numpy dtype)} of every tensor, from the headers alone."""
        return {k: (shape, np.dtype(dt)) for k, (_, shape, dt, _, _) in self._where.items()}

    def __getitem__(self, key: str) -> np.ndarray:
        f, shape, dt, b, e = self._where[key]
        if f not in self._maps:
            self._maps[f] = np.memmap(f, dtype=np.uint8, mode="r")
        return self._maps[f][b:e].view(dt).reshape(shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


class PreadReader(SafetensorsReader):
    """`SafetensorsReader` that reads each tensor with `os.pread` into a fresh array instead of a memory map, so
    pages of tensors already converted do not stay resident (a memory map would count the whole file in the
    process's resident memory by the end of a conversion)."""

    def __getitem__(self, key: str) -> np.ndarray:
        f, shape, dt, b, e = self._where[key]
        out = np.empty(shape, dt)
        view = memoryview(out.reshape(-1).view(np.uint8))
        with open(f, "rb", buffering=0) as fh:
            pos = 0
            while pos < e - b:
                n = os.preadv(fh.fileno(), [view[pos:]], b + pos)
                if n <= 0:
                    raise cli.BadFile(f"{f}: unexpected end of file reading tensor {key!r}")
                pos += n
        return out


class MultiFileReader(Mapping):
    """Several safetensors files (each a `PreadReader`) as one lazy {key: array} mapping with `specs`; a key found
    in two files is an error."""

    def __init__(self, files: Sequence[str]):
        self.readers = [PreadReader(f) for f in files]
        self._owner: dict[str, PreadReader] = {}
        for reader, f in zip(self.readers, files, strict=True):
            for key in reader:
                if key in self._owner:
                    raise cli.BadInput(f"{f}: tensor {key!r} is also in {self._owner[key].files[0]}; an exported "
                                       f"folder holds each tensor once")
                self._owner[key] = reader

    @property
    def specs(self) -> dict[str, Spec]:
        """{key: (shape, numpy dtype)} over all the files."""
        out: dict[str, Spec] = {}
        for reader in self.readers:
            out.update(reader.specs)
        return out

    def __getitem__(self, key: str) -> np.ndarray:
        return self._owner[key][key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._owner)

    def __len__(self) -> int:
        return len(self._owner)


def write_safetensors(path: str, specs: Mapping[str, Spec], tensors: Iterable[tuple[str, np.ndarray]],
                      metadata: Mapping[str, str] | None = None) -> None:
    """Streams a `.safetensors` file: the header from `specs` ({key: (shape, dtype)}) first, then each tensor of
    `tensors` (any order, each cast to its spec's dtype) written at its offset, so only one tensor is in memory at a
    time. Raises naming the key for a dtype safetensors cannot store, a tensor outside `specs`, a shape that differs
    from its spec, or a spec'd tensor never written."""
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offsets, pos = {}, 0
    for key in sorted(specs):
        shape, dtype = specs[key]
        dtype = np.dtype(dtype)
        if dtype not in NAMES:
            raise ValueError(f"{path}: tensor {key!r} has dtype {dtype}, which safetensors cannot store")
        n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        header[key] = {"dtype": NAMES[dtype], "shape": list(shape), "data_offsets": [pos, pos + n]}
        offsets[key] = (pos, n, tuple(shape), dtype)
        pos += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data start stays 8-byte aligned, as the safetensors writer does
    base = 8 + len(blob)
    seen = set()
    with open(path, "wb") as fh:
        fh.write(len(blob).to_bytes(8, "little"))
        fh.write(blob)
        fh.truncate(base + pos)
        for key, x in tensors:
            if key not in offsets:
                raise ValueError(f"{path}: tensor {key!r} is not in the planned header")
            off, n, shape, dtype = offsets[key]
            x = np.require(np.asarray(x, dtype=dtype), requirements="C")  # keeps 0-d tensors 0-d
            if x.shape != shape:
                raise ValueError(f"{path}: tensor {key!r} is {x.shape}, the header says {shape}")
            fh.seek(base + off)
            fh.write(memoryview(x.reshape(-1).view(np.uint8)))
            seen.add(key)
    missing = sorted(set(offsets) - seen)
    if missing:
        raise ValueError(f"{path}: {len(missing)} tensor(s) were never written: {missing[:10]}")
