"""SA-V training clips as a TFDS dataset (`SavClips`), written as array_record and read without TensorFlow.

Build (the SA-V train tars or folders + the captions sidecar; nothing is downloaded):

    python -m ttm_jax.data.prepare --format=tfds --sav=PATH --captions=JSONL --out=DATA_DIR \
        [--config=configs/stage2.py[:variant]] [--clips_per_video=1] [--seed=0]

or in Python

    builder = tfds_sav.SavClips(data_dir=DATA_DIR, config="tiny", sav_path=PATH, captions=JSONL)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=PATH),
                                 file_format="array_record")

(with `sav_path`/`captions` left out, both come from `DownloadConfig(manual_dir=...)`: the SA-V tars and
`captions.jsonl` inside it). Load, random access, no TensorFlow:

    import ttm_jax.data.tfds_sav  # registers "sav_clips"
    ds = tfds.data_source("sav_clips/tiny", data_dir=DATA_DIR, split="train")   # or builder.as_data_source("train")
    example = tfds_sav.to_example(ds[0])  # the training example of CONTRIBUTING.md (str text, int num_objects)

Training reads such a folder like a `prepare` folder: set `config.data.prepared_path` to
`<DATA_DIR>/sav_clips/<config>/<version>` (`loader.make_dataset` recognises its `dataset_info.json`).

Records are exactly `clips.make_examples(ref, entry, config.data, [clips.clip_seed(seed, video_id, c) ...])`, the
same clips `python -m ttm_jax.data.prepare` writes for the same seed; the key of a record is `"<video_id>/<clip>"`
(stable, so a rebuild gives the same files). Features (T = num_frames, K = max_objects):

    video uint8 [T, H, W, 3] (bytes)   trajectory uint8 [T, H, W, 3] (zlib)   object_masks bool [T, H, W, K] (zlib)
    frame_indices / mask_frame_indices int32 [T]   num_objects int32   clip int32
    caption, motion_prompt, video_id Text          local_prompts, masklet_keys str [K]

Skipped videos (no caption line, broken annotation or mp4, too short, ...) are logged with their file, counted by
reason, and the counts are kept in the dataset's metadata (`builder.info.metadata["skipped"]`, `metadata.json`).

On Apache Beam (`pip install -e .[beam]`): give the build pipeline options, and the same records are made by Beam
transforms (`data/beam_sav.py`: decode, rasterise, cut, skips as Beam counters read back into the same metadata),
on the DirectRunner locally or unchanged on Dataflow / Spark / Flink:

    python -m ttm_jax.data.prepare --format=tfds ... --beam_pipeline_options="runner=DirectRunner,direct_num_workers=2"
    tfds_sav.build(..., beam_options="runner=DataflowRunner,project=P,region=R,temp_location=gs://...,setup_file=...")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(beam_options=PipelineOptions(...)))

(`tfds build --imports=ttm_jax.data.tfds_sav sav_clips/tiny --manual_dir=PATH --beam_pipeline_options=...` imports
TensorFlow in tfds 4.9.10's command line, absent from this environment: use `python -m ttm_jax.data.prepare`.)

Without TensorFlow (tensorflow-datasets 4.9.10): `GeneratorBasedBuilder.download_and_prepare(file_format=
"array_record")`, `as_data_source` and `tfds.data_source` work with TF absent (examples are serialized as
tf.train.Example protos by TFDS' own pure-Python path); `as_dataset` (tf.data) and the `tfds.features.Video`/`Image`
features need TF, so this builder uses only `Tensor`/`Text` features and is read through data sources.
`dataset_info_from_configs` reads package metadata files from the builder's folder, so `_info` builds
`tfds.core.DatasetInfo` directly.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from ttm_jax import config as config_lib
from ttm_jax.data import beam_sav, clips, sav
from ttm_jax.data import captions as captions_lib
from ttm_jax.data.video_io import SkipVideo

NAME = "sav_clips"
# builder config name -> ttm config variant (TFDS config names cannot hold a ".")
VARIANTS = {"tiny": "tiny", "mid": "mid", "wan1_3b": "wan1.3b"}
TEXT_FIELDS = ("caption", "motion_prompt", "video_id")
STR_LIST_FIELDS = ("local_prompts", "masklet_keys")
INFO_FILE = "dataset_info.json"
CAPTIONS_FILE = "captions.jsonl"  # the captions sidecar inside the manual dir


@dataclasses.dataclass(eq=False)
class SavClipsConfig(tfds.core.BuilderConfig):
    """A clip shape: `data` holds the data-config keys that make records different (`clips.DATA_KEYS`)."""

    data: dict = dataclasses.field(default_factory=dict)


def variant_config(name: str) -> SavClipsConfig:
    """The builder config of a ttm config variant (`tiny`, `mid`, `wan1_3b`)."""
    d = config_lib.build(2, VARIANTS[name]).data
    return SavClipsConfig(name=name, data=clips.data_settings(d),
                          description=f"{d.num_frames}x{d.height}x{d.width} clips at {d.fps:g} fps, "
                                      f"up to {d.max_objects} objects (config variant {VARIANTS[name]})")


def builder_config(data_config: ml_collections.ConfigDict) -> str | SavClipsConfig:
    """The builder config for `data_config`: a predefined variant's name if the settings match one, else a
    `custom_<hash>` config (a name that changes with any setting that changes the records)."""
    settings = clips.data_settings(data_config)
    for c in SavClips.BUILDER_CONFIGS:
        if c.data == settings:
            return c.name
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    return SavClipsConfig(name=f"custom_{digest}", data=settings, description=json.dumps(settings, sort_keys=True))


class SavClips(tfds.core.GeneratorBasedBuilder):
    """SA-V videos + captions sidecar -> fixed-size TTM training clips (module docstring)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Clips of clips.make_examples (records format 1 of ttm_jax.data.records)."}
    BUILDER_CONFIGS = [variant_config(n) for n in VARIANTS]
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Put the SA-V train tars (sav_000.tar, ...; or extracted folders) and the captions sidecar `captions.jsonl` "
        "in the manual dir (DownloadConfig(manual_dir=...)), or pass sav_path=/captions= to SavClips(...). "
        "SA-V: https://ai.meta.com/datasets/segment-anything-video/ (licence acceptance needed).")

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # tfds 4.9.10 resolves the builder's file through `importlib_resources` (not installed here: a package whose
        # resource path is a plain path reaches an `isinstance(path, importlib_resources.abc.Traversable)`); this
        # module's own file is the same answer without that package
        return epath.Path(__file__)

    def __init__(self, *, sav_path: str | Sequence[str] | None = None, captions: str | None = None, seed: int = 0,
                 clips_per_video: int = 1, **kwargs: Any):
        if clips_per_video < 1:
            raise ValueError(f"SavClips: clips_per_video={clips_per_video} must be >= 1")
        self._sav_path = sav_path
        self._captions = captions
        self._seed = int(seed)
        self._clips_per_video = int(clips_per_video)
        self._use_beam = False  # set per build by `_generate_splits`
        self._find_skips: dict[str, int] = {}  # skips of `sav.find_videos` on the launching host (Beam builds)
        super().__init__(**kwargs)

    @property
    def data_config(self) -> ml_collections.ConfigDict:
        """The data settings of this builder config, as a `config.data`-like ConfigDict."""
        d = config_lib.build(2, "tiny").data
        d.update(self.builder_config.data)
        return d

    def _info(self) -> tfds.core.DatasetInfo:
        d = self.builder_config.data
        t, h, w, k = int(d["num_frames"]), int(d["height"]), int(d["width"]), int(d["max_objects"])
        zlib = tfds.features.Encoding.ZLIB
        raw = tfds.features.Encoding.BYTES
        features = tfds.features.FeaturesDict({
            "video": tfds.features.Tensor(shape=(t, h, w, 3), dtype=np.uint8, encoding=raw),
            # mostly black / mostly False: zlib shrinks them many times
            "trajectory": tfds.features.Tensor(shape=(t, h, w, 3), dtype=np.uint8, encoding=zlib),
            "object_masks": tfds.features.Tensor(shape=(t, h, w, k), dtype=np.bool_, encoding=zlib),
            "frame_indices": tfds.features.Tensor(shape=(t,), dtype=np.int32, encoding=raw),
            "mask_frame_indices": tfds.features.Tensor(shape=(t,), dtype=np.int32, encoding=raw),
            "num_objects": tfds.features.Scalar(dtype=np.int32),
            "clip": tfds.features.Scalar(dtype=np.int32),
            "caption": tfds.features.Text(),
            "motion_prompt": tfds.features.Text(),
            "video_id": tfds.features.Text(),
            "local_prompts": tfds.features.Tensor(shape=(k,), dtype=np.str_),
            "masklet_keys": tfds.features.Tensor(shape=(k,), dtype=np.str_),
        })
        return tfds.core.DatasetInfo(
            builder=self, description=__doc__.split("\n")[0], features=features,
            homepage="https://ai.meta.com/datasets/segment-anything-video/", metadata=tfds.core.MetadataDict())

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Iterator]:
        sav_path = self._sav_path or os.fspath(dl_manager.manual_dir)
        captions = self._captions or os.path.join(os.fspath(dl_manager.manual_dir), CAPTIONS_FILE)
        annotation = self.builder_config.data.get("annotation", "manual")
        counter = sav.SkipCounter(f"tfds {NAME}/{self.builder_config.name}")
        if isinstance(sav_path, str) and "," in sav_path:
            sav_path = sav_path.split(",")
        refs = sav.find_videos(sav_path, annotation, counter=counter)
        if not refs:
            raise FileNotFoundError(f"SavClips: no SA-V videos with {annotation} annotations under {sav_path!r} "
                                    f"({counter.summary()}); check sav_path= or the manual dir")
        if not epath.Path(captions).exists():
            raise FileNotFoundError(f"SavClips: captions sidecar {captions} not found; pass captions= or put "
                                    f"captions.jsonl in the manual dir")
        if self._use_beam:  # the same records from Beam transforms; counts read back at the end
            self._find_skips = dict(counter.counts)
            return {"train": beam_sav.clips_transform(refs, captions, self.data_config, seed=self._seed,
                                                      clips_per_video=self._clips_per_video)}
        return {"train": self._generate_examples(refs, captions_lib.load_captions(captions), counter)}

    def _generate_splits(self, dl_manager: tfds.download.DownloadManager,
                         download_config: tfds.download.DownloadConfig) -> Any:
        # Beam when the build was given pipeline options or a runner (TFDS then runs the PTransform of
        # `_split_generators` in its pipeline), else the single-process generator
        self._use_beam = download_config.beam_options is not None or download_config.beam_runner is not None
        if self._use_beam:
            beam_sav.require_beam()
        return super()._generate_splits(dl_manager, download_config)

    def _process_pipeline_result(self, pipeline_result: Any) -> None:
        """After the Beam run: the `sav_clips` counters -> the same metadata the single-process build writes."""
        ok, num, skipped = beam_sav.counts(pipeline_result)
        counts = collections.Counter(self._find_skips)
        counts.update(skipped)
        logging.info("SavClips (beam): videos: %d ok, %d records, skipped %s", ok, num, dict(sorted(counts.items())))
        self._set_metadata(ok, num, dict(counts))

    def _set_metadata(self, ok: int, num: int, skipped: Mapping[str, int]) -> None:
        self.info.metadata.update({
            "data": dict(self.builder_config.data), "seed": self._seed, "clips_per_video": self._clips_per_video,
            "videos_ok": ok, "skipped": dict(skipped), "num_records": num, "latents": None,
        })

    def _generate_examples(self, refs: Sequence[sav.VideoRef], captions: Mapping[str, captions_lib.CaptionEntry],
                           counter: sav.SkipCounter) -> Iterator[tuple[str, dict]]:
        """Yields `("<video_id>/<clip>", example)`; skips are counted by reason and saved in the metadata."""
        data = self.data_config
        ok = num = 0
        for ref in refs:
            try:
                entry = captions_lib.lookup(captions, ref.video_id, file=ref.video.name,
                                            missing=data.get("missing_captions", "skip"))
                seeds = [clips.clip_seed(self._seed, ref.video_id, c) for c in range(self._clips_per_video)]
                examples = clips.make_examples(ref, entry, data, seeds)
            except SkipVideo as e:
                counter.add(e)
                continue
            ok += 1
            for c, e in enumerate(examples):
                e["clip"] = c
                num += 1
                yield f"{ref.video_id}/{c}", e
        logging.info("SavClips: videos: %d ok, %s", ok, counter.summary())
        self._set_metadata(ok, num, dict(counter.counts))


def to_example(record: Mapping[str, Any]) -> dict[str, Any]:
    """A decoded TFDS record -> the training example of CONTRIBUTING.md (text as `str`, lists of `str`, ints)."""
    out = dict(record)
    for k in TEXT_FIELDS:
        v = out[k]
        out[k] = v.decode() if isinstance(v, bytes) else str(v)
    for k in STR_LIST_FIELDS:
        out[k] = [v.decode() if isinstance(v, bytes) else str(v) for v in out[k]]
    out["num_objects"] = int(out["num_objects"])
    out["clip"] = int(out["clip"])
    return out


def is_tfds_folder(path: str) -> bool:
    """True for a built TFDS dataset folder (`<data_dir>/sav_clips/<config>/<version>`)."""
    return epath.Path(path, INFO_FILE).exists()


def builder_from_folder(path: str) -> tfds.core.DatasetBuilder:
    """The read-only builder of a built folder; raises naming the fix if it is not one."""
    if not is_tfds_folder(path):
        raise FileNotFoundError(f"{os.path.join(path, INFO_FILE)}: not a built TFDS folder; build it with "
                                f"`python -m ttm_jax.data.prepare --format=tfds --out=DATA_DIR ...` and point "
                                f"config.data.prepared_path at DATA_DIR/{NAME}/<config>/<version>")
    return tfds.builder_from_directory(path)


def manifest(path: str) -> dict:
    """A built folder's metadata in the shape of a `prepare` manifest (`data`, `latents`, `num_records`, `skipped`),
    for `loader.check_manifest`."""
    b = builder_from_folder(path)
    meta = dict(b.info.metadata or {})
    meta["num_records"] = b.info.splits["train"].num_examples
    meta.setdefault("latents", None)
    meta["file"] = "metadata.json"  # where these settings live, for error messages
    return meta


def data_source(path: str, split: str = "train") -> Sequence[dict]:
    """Random-access records of a built folder (`ArrayRecordDataSource`; no TensorFlow), decoded to numpy/bytes."""
    return builder_from_folder(path).as_data_source(split)


def build(sav_path: str | Sequence[str], captions: str, data_dir: str, config: ml_collections.ConfigDict, *,
          seed: int = 0, clips_per_video: int = 1, beam_options: Any = None) -> SavClips:
    """Builds `SavClips` for `config.data` into `data_dir` (array_record); returns the builder (`builder.data_dir` is
    the folder to set as `config.data.prepared_path`). Idempotent: a finished folder is left as it is.

    `beam_options`: None (single process), or Beam pipeline options (`"runner=DirectRunner,direct_num_workers=2"`,
    `--key=value` flags, or `PipelineOptions`; `beam_sav.pipeline_options`): the same records made on Apache Beam.
    """
    options = None if beam_options is None else beam_sav.pipeline_options(beam_options)
    builder = SavClips(data_dir=data_dir, config=builder_config(config.data), sav_path=sav_path, captions=captions,
                       seed=seed, clips_per_video=clips_per_video, file_format="array_record")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(beam_options=options))
    meta = builder.info.metadata or {}
    if meta.get("seed") != seed or meta.get("clips_per_video") != clips_per_video:
        raise ValueError(f"{builder.data_dir}: built with seed={meta.get('seed')}, clips_per_video="
                         f"{meta.get('clips_per_video')}, asked for seed={seed}, clips_per_video={clips_per_video}; "
                         f"use another --out")
    return builder
