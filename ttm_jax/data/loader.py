"""The training data loader: prepared ArrayRecord shards -> Grain -> batches of numpy arrays.

    source (ArrayRecord records, in manifest order)
      -> [process_index::process_count]   each JAX process reads its own disjoint slice
      -> shuffle(config.data.shuffle_seed) -> repeat()   (reshuffled every epoch, deterministically)
      -> decode + tokenize                 records.decode; captions / motion / local prompts -> ids and masks
      -> batch(train.batch_size // process_count, drop_remainder)
      -> to_iter_dataset (threads) -> mp_prefetch(config.data.num_workers processes, when > 0)

The iterator is a `grain.DatasetIterator`: `get_state()` / `set_state()` (or grain's Orbax checkpoint handler) resume
it on the very next batch. No random augmentation: a horizontal flip or time reversal would make "slides left" a
lie, and crops are chosen (deterministically) at preparation time.

Batch (per process, `B = train.batch_size // process_count`; CONTRIBUTING.md "Batches"):

    video            uint8   [B, T, H, W, 3]
    trajectory       uint8   [B, T, H, W, 3]
    object_masks     bool    [B, T, H, W, K]
    num_objects      int32   [B]
    caption_tokens   int32   [B, Lc]      caption_mask bool [B, Lc]      (Lc = text_encoder.max_length)
    motion_tokens    int32   [B, Lc]      motion_mask  bool [B, Lc]
    local_tokens     int32   [B, K+1, Lp] local_mask   bool [B, K+1, Lp] (slot 0 = caption; Lp = local_max_length)
    video_latent, trajectory_latent  float32 [B, T', H', W', C]   only when the records carry cached latents
    caption_embedding, motion_embedding float32 [B, Lc, d], local_embedding float32 [B, K+1, Lp, d]
                     only with `config.data.cached` (a folder of `python -m ttm_jax.data.encode`): the text
                     encoder's output, padding zero; tokens and masks then come from the records (no tokenizer),
                     and `video` / `trajectory` are left out (the step reads the cached latents)

Grain worker processes re-import this module: scripts that set `num_workers > 0` need an
`if __name__ == "__main__":` guard and parsed absl flags (`app.run`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import tempfile
from collections.abc import Sequence
from typing import Any

import grain
import ml_collections
import numpy as np
from etils import epath

from ttm_jax import config as config_lib
from ttm_jax import storage
from ttm_jax.data import clips, prepare, records, synthetic, tfds_sav
from ttm_jax.models.tokenizer import make_tokenizer

# data-config keys whose mismatch with the prepared records changes batch shapes: an error, not a warning
SHAPE_KEYS = ("num_frames", "height", "width", "max_objects")
# autoencoder keys that make cached latents mean something else (and `config.IDENTITY_LATENT_NORM`'s, absent = identity)
LATENT_KEYS = ("name", "time_factor", "space_factor", "latent_channels", "path")
SOURCE_FPS = 24.0
MIN_SYNTHETIC_SIDE = 128


def tokenize_prompts(tokenizer: Any, caption: str, motion_prompt: str, local_prompts: Sequence[str], *,
                     max_length: int, local_max_length: int) -> dict[str, np.ndarray]:
    """The text of one example as the batches hold it (the one tokenization of training and sampling): caption and
    motion prompt at `max_length` (`caption_tokens`/`_mask`, `motion_tokens`/`_mask` `[L]`); local slots
    `local_tokens`/`local_mask` `[K+1, Lp]`, slot 0 the caption, slot k object k's local prompt; an object without a
    prompt (padding slot, uncaptioned masklet) has no tokens at all, not a lone eos."""
    (cap_ids, mot_ids), (cap_mask, mot_mask) = tokenizer.encode([caption, motion_prompt], max_length)
    local = [caption, *local_prompts]
    loc_ids, loc_mask = tokenizer.encode(local, local_max_length)
    empty = np.array([i > 0 and not t for i, t in enumerate(local)])
    loc_mask = np.where(empty[:, None], False, loc_mask)
    loc_ids = np.where(loc_mask, loc_ids, 0)
    return {"caption_tokens": cap_ids.astype(np.int32), "caption_mask": cap_mask.astype(bool),
            "motion_tokens": mot_ids.astype(np.int32), "motion_mask": mot_mask.astype(bool),
            "local_tokens": loc_ids.astype(np.int32), "local_mask": loc_mask.astype(bool)}


# the fields of a record the batch takes when the text is not cached (embeddings are not even decoded) and when it is
# (pixels are not: the step reads the cached latents, and a clip's pixels are the bulk of a record)
_PIXEL_FIELDS = tuple(f for f in records.ARRAY_FIELDS if f not in records.TEXT_FIELDS)
_CACHED_FIELDS = tuple(f for f in records.ARRAY_FIELDS if f not in ("video", "trajectory"))


# text-encoder fields that may differ between the encoding run and training (warned, not refused): the weights' path
# (another host's mount of the same files), the tokenizer's path, the compute dtype
_LOOSE_TEXT_KEYS = ("path", "tokenizer_path", "dtype")


def text_settings(config: ml_collections.ConfigDict) -> dict:
    """What cached text embeddings depend on: the text encoder config, and the seed of a randomly initialised one
    (`data/encode` pins it in its manifest as `text_embeddings`)."""
    t = config.text_encoder.to_dict()
    return {"text_encoder": t, "seed": None if t.get("path") else int(config.seed)}


@dataclasses.dataclass
class DecodeAndTokenize(grain.transforms.Map):
    """Record bytes -> one example of the batch dict (no batch axis); picklable for Grain workers. `cached`: the
    records carry the text (tokens, masks, embeddings of `data/encode`), taken as they are (no tokenizer)."""

    text_config: dict
    keep_latents: bool = True
    cached: bool = False

    def __post_init__(self):
        self._tokenizer = None if self.cached else make_tokenizer(ml_collections.ConfigDict(self.text_config))

    def __getstate__(self):
        return {"text_config": self.text_config, "keep_latents": self.keep_latents, "cached": self.cached}

    def __setstate__(self, state):
        self.__init__(**state)

    def _cached_text(self, r: dict) -> dict[str, np.ndarray]:
        lc, lp = int(self.text_config["max_length"]), int(self.text_config["local_max_length"])
        out = {k: r[k] for k in ("caption_tokens", "caption_mask", "motion_tokens", "motion_mask", "local_tokens",
                                 "local_mask")}
        out["caption_embedding"] = records.pad_embedding(r["caption_embedding"], lc)
        out["motion_embedding"] = records.pad_embedding(r["motion_embedding"], lc)
        out["local_embedding"] = records.pad_embedding(r["local_embedding"], lp)
        return out

    def map(self, record: bytes) -> dict[str, np.ndarray]:
        # bytes from a `prepare` folder, or an example dict from a TFDS-built one (`tfds_sav.to_example`)
        if isinstance(record, dict):
            r = record
        else:
            r = records.decode(record, fields=_CACHED_FIELDS if self.cached else _PIXEL_FIELDS)
        if self.cached:
            out = {"object_masks": r["object_masks"], "num_objects": np.int32(r["num_objects"]),
                   **self._cached_text(r)}
        else:
            out = {
                "video": r["video"],
                "trajectory": r["trajectory"],
                "object_masks": r["object_masks"],
                "num_objects": np.int32(r["num_objects"]),
                **tokenize_prompts(self._tokenizer, r["caption"], r["motion_prompt"], r["local_prompts"],
                                   max_length=int(self.text_config["max_length"]),
                                   local_max_length=int(self.text_config["local_max_length"])),
            }
        if self.keep_latents and "video_latent" in r:
            out["video_latent"] = r["video_latent"]
            out["trajectory_latent"] = r["trajectory_latent"]
        return out


def check_manifest(manifest: dict, config: ml_collections.ConfigDict, folder: str) -> None:
    """Raises if the prepared records do not have the shapes `config` asks for; warns on other differences."""
    data = manifest.get("data", {})
    where = os.path.join(folder, manifest.get("file", records.MANIFEST))  # TFDS folders: metadata.json
    for k in SHAPE_KEYS:
        if k in data and data[k] != config.data[k]:
            raise ValueError(f"{where}: records were prepared with data.{k}={data[k]} but config.data.{k}="
                             f"{config.data[k]}; prepare again with this config (python -m ttm_jax.data.prepare "
                             f"--config=...) or set config.data.prepared_path to a matching folder")
    for k, v in data.items():
        if k not in SHAPE_KEYS and config.data.get(k) is not None and config.data.get(k) != v:
            logging.warning("%s: records prepared with data.%s=%r, config has %r", where, k, v, config.data.get(k))
    lat = manifest.get("latents")
    if lat is not None:
        ae = config.autoencoder.to_dict()
        differ = sorted([k for k in LATENT_KEYS if lat.get(k) != ae.get(k)]
                        + [k for k, d in config_lib.IDENTITY_LATENT_NORM.items() if lat.get(k, d) != ae.get(k, d)])
        if differ:
            raise ValueError(f"{where}: cached latents were made by autoencoder "
                             f"{ {k: lat.get(k) for k in differ} } but config.autoencoder has "
                             f"{ {k: ae.get(k) for k in differ} }; prepare again with this config (--latents) or "
                             f"without --latents")
    if config.data.cached:
        missing = [k for k in ("latents", "text_embeddings") if manifest.get(k) is None]
        if missing:
            raise ValueError(f"{where}: config.data.cached is True but these records have no cached "
                             f"{' / '.join(missing)}; run `python -m ttm_jax.data.encode --prepared={folder} "
                             f"--out=<new folder> --config=...` and set config.data.prepared_path to that folder, or "
                             f"set config.data.cached=False")
        want, got = text_settings(config), manifest["text_embeddings"]
        if got != want:
            differ = sorted(k for k in set(got["text_encoder"]) | set(want["text_encoder"])
                            if got["text_encoder"].get(k) != want["text_encoder"].get(k))
            differ += ["seed"] if got.get("seed") != want["seed"] else []
            # where the weights live and the compute dtype: another host's mount, or bf16 here, is not another model
            loose = [k for k in differ if k in _LOOSE_TEXT_KEYS]
            if loose:
                logging.warning("%s: cached text embeddings made with text_encoder.%s = %s; the config has %s (used "
                                "as they are)", where, "/".join(loose), [got["text_encoder"].get(k) for k in loose],
                                [want["text_encoder"].get(k) for k in loose])
            differ = [k for k in differ if k not in _LOOSE_TEXT_KEYS]
        if got != want and differ:
            raise ValueError(f"{where}: cached text embeddings were made with other text encoder settings "
                             f"(text_encoder.{', text_encoder.'.join(differ)} differ from the config); encode again "
                             f"with this config (python -m ttm_jax.data.encode) or set config.data.cached=False")
    if manifest.get("num_records", 0) < 1:
        raise ValueError(f"{where}: no records (all videos skipped: {manifest.get('skipped')}); check the SA-V "
                         f"path and captions it was prepared from")


def make_dataset(config: ml_collections.ConfigDict, path: str, *, process_index: int = 0,
                 process_count: int = 1) -> grain.MapDataset:
    """The infinite, shuffled, decoded (unbatched) `MapDataset` of this process' slice of the records at `path`: a
    `prepare` folder, or a TFDS-built `sav_clips/<config>/<version>` folder (`data/tfds_sav.py`)."""
    to_example = None
    if tfds_sav.is_tfds_folder(path):  # through etils.epath: gs:// too
        manifest, source, to_example = tfds_sav.manifest(path), tfds_sav.data_source(path), tfds_sav.to_example
    else:
        manifest = records.load_manifest(path)
        source = records.CheckedShards(path, manifest)  # a shard damaged mid-run: ShardUnreadable, naming it
    check_manifest(manifest, config, path)
    if not 0 <= process_index < process_count:
        raise ValueError(f"make_dataset: process_index={process_index} not in [0, process_count={process_count})")
    ds = grain.MapDataset.source(source)
    if len(ds) < process_count:
        raise ValueError(f"{path}: {len(ds)} records cannot be split over {process_count} processes; prepare more "
                         f"videos (config.data.synthetic_num_videos or --clips_per_video)")
    ds = ds[process_index::process_count]
    ds = ds.shuffle(seed=int(config.data.shuffle_seed)).repeat(None)
    if to_example is not None:
        ds = ds.map(to_example)
    return ds.map(DecodeAndTokenize(config.text_encoder.to_dict(), cached=bool(config.data.cached)))


def check_cached(config: ml_collections.ConfigDict) -> None:
    """With `config.data.cached`: `config.data.prepared_path` holds cached latents and text embeddings made with
    this config's autoencoder and text encoder (a `ValueError` naming the file and the fix otherwise)."""
    if not config.data.cached:
        return
    path = config.data.prepared_path
    if epath.Path(os.path.join(path, "dataset_info.json")).exists():
        raise ValueError(f"{path}: config.data.cached is True but this is a TFDS folder, which holds no cached "
                         f"embeddings; encode a `python -m ttm_jax.data.prepare` folder with `python -m "
                         f"ttm_jax.data.encode` or set config.data.cached=False")
    check_manifest(records.load_manifest(path), config, path)
    encode_empty = epath.Path(os.path.join(path, "empty_text.npz"))
    if not encode_empty.exists():
        raise ValueError(f"{encode_empty}: missing (the empty prompt's embeddings of `python -m ttm_jax.data.encode`);"
                         f" resume the encoding into {path}, or set config.data.cached=False")


def local_batch_size(config: ml_collections.ConfigDict, process_count: int) -> int:
    b = int(config.train.batch_size)
    if b % process_count:
        raise ValueError(f"config.train.batch_size={b} is not divisible by the {process_count} JAX processes; set it "
                         f"to a multiple of {process_count}")
    return b // process_count


def make_train_iterator(config: ml_collections.ConfigDict, *, process_index: int, process_count: int,
                        workdir: str) -> grain.DatasetIterator:
    """A checkpointable iterator of this process' batches (module docstring); data from `config.data.prepared_path`,
    else prepared from `config.data.sav_path`, else synthetic SA-V (`ensure_default_data`)."""
    path = resolve_prepared_path(config, workdir)
    ds = make_dataset(config, path, process_index=process_index, process_count=process_count)
    ds = ds.batch(local_batch_size(config, process_count), drop_remainder=True)
    threads = int(config.data.read_threads)
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads,  # 0: read on next(), nothing ahead
                                                 prefetch_buffer_size=max(threads, 2) if threads else 0))
    workers = int(config.data.num_workers)
    if workers > 0:
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
    return iter(it_ds)


# ------------------------------------------------------------------------------------------------- default data


def _fingerprint(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:10]


def synthetic_params(config: ml_collections.ConfigDict) -> dict:
    """Synthetic SA-V sized for `config.data`: enough 24 fps frames for a clip (plus room for several starts), and
    at least 128 pixels on the short side, at the clip's aspect ratio."""
    d = config.data
    span = 1 + math.ceil((int(d.num_frames) - 1) * SOURCE_FPS / float(d.fps))
    frames = span + 16
    scale = max(1, math.ceil(MIN_SYNTHETIC_SIDE / min(int(d.height), int(d.width))))
    h, w = int(d.height) * scale, int(d.width) * scale
    p = {"num_videos": int(d.synthetic_num_videos), "seed": int(config.seed), "split": "mixed",
         "height": h + h % 2, "width": w + w % 2, "frames": frames}
    rung = int(d.synthetic_rung)
    return p if rung == synthetic.FULL_RUNG else {**p, "rung": rung}  # the full set's folders keep their names


def _cache_root(config: ml_collections.ConfigDict, workdir: str) -> str:
    if config.data.synthetic_dir:
        return config.data.synthetic_dir
    if storage.is_remote(workdir):  # a gs:// workdir: the generator writes local files; a per-host local cache
        return os.path.join(tempfile.gettempdir(), "ttm_jax_synthetic_sav")
    return os.path.join(os.path.dirname(os.path.abspath(workdir.rstrip("/"))), "synthetic_sav")


def ensure_default_data(config: ml_collections.ConfigDict, workdir: str) -> str:
    """Synthetic SA-V generated into `config.data.synthetic_dir` (default `<workdir>/../synthetic_sav`; a gs://
    workdir's: the local `<tmp>/ttm_jax_synthetic_sav`) and prepared for `config.data`, unless already there; returns
    the prepared folder. Safe to call from every process at once: all files are deterministic and written atomically."""
    root = _cache_root(config, workdir)
    p = synthetic_params(config)
    videos = os.path.join(root, f"videos-{_fingerprint(p)}")
    full = synthetic.params(videos_per_shard=32, with_auto=False, **p)
    if not synthetic.is_complete(videos, full):
        logging.info("ensure_default_data: generating %d synthetic SA-V videos into %s", p["num_videos"], videos)
        synthetic.generate(videos, p["num_videos"], p["seed"], split=p["split"], height=p["height"],
                           width=p["width"], frames=p["frames"], videos_per_shard=32,
                           rung=p.get("rung", synthetic.FULL_RUNG))
    prepared = os.path.join(root, f"prepared-{_fingerprint([full, clips.data_settings(config.data)])}")
    if not os.path.exists(os.path.join(prepared, records.MANIFEST)):
        logging.info("ensure_default_data: preparing %s into %s", videos, prepared)
        summary = prepare.prepare(videos, os.path.join(videos, synthetic.CAPTIONS_FILE), prepared, config,
                                  seed=int(config.seed))
        logging.info("ensure_default_data: %s", summary.line())
    return prepared


def resolve_prepared_path(config: ml_collections.ConfigDict, workdir: str) -> str:
    """`config.data.prepared_path`; else SA-V at `config.data.sav_path` prepared into `<workdir>/prepared`; else
    synthetic SA-V (`ensure_default_data`)."""
    d = config.data
    if d.prepared_path:
        return d.prepared_path
    if d.sav_path:
        if not d.captions:
            raise ValueError("config.data.sav_path is set but config.data.captions is empty; give the captions "
                             "sidecar JSONL (SA-V ships no captions)")
        out = os.path.join(workdir, "prepared")
        if not epath.Path(out, records.MANIFEST).exists():
            logging.info("preparing %s into %s", d.sav_path, out)
            logging.info("%s", prepare.prepare(d.sav_path, d.captions, out, config, seed=int(config.seed)).line())
        return out
    return ensure_default_data(config, workdir)
