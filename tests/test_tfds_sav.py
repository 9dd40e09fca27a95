"""The SA-V TFDS builder: array_record built and read without TensorFlow, records = clips.make_examples for the same
seeds, skips counted, deterministic keys, and the Grain loader trains from a TFDS-built folder."""

import collections
import glob
import hashlib
import importlib.util
import json
import logging
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds
from sample_data import synthetic_sav_without_last_caption

from ttm_jax import config as config_lib
from ttm_jax.data import captions as captions_lib
from ttm_jax.data import clips, loader, prepare, records, sav, synthetic, tfds_sav

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N = 3  # captioned synthetic videos; one more has no caption line
SEED, CLIPS = 3, 2
ARRAYS = ("video", "trajectory", "object_masks", "frame_indices", "mask_frame_indices")
TEXTS = ("caption", "motion_prompt", "video_id", "local_prompts", "masklet_keys", "num_objects")


@pytest.fixture(scope="module")
def config():
    return config_lib.validate(config_lib.build(2, "tiny"))


@pytest.fixture(scope="module")
def sav_dir(tmp_path_factory):
    """Synthetic SA-V (tar shard + captions.jsonl) whose last video has no caption line."""
    return synthetic_sav_without_last_caption(str(tmp_path_factory.mktemp("sav")), N + 1, frames=40)


@pytest.fixture(scope="module")
def built(sav_dir, config, tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    captions = os.path.join(sav_dir, synthetic.CAPTIONS_FILE)
    return tfds_sav.build(sav_dir, captions, data_dir, config, seed=SEED, clips_per_video=CLIPS)


@pytest.fixture(scope="module")
def expected(sav_dir, config):
    """(video_id, clip) -> clips.make_examples output for the seeds `prepare` uses, for every captioned video."""
    caps = captions_lib.load_captions(os.path.join(sav_dir, synthetic.CAPTIONS_FILE))
    out = {}
    for ref in sav.find_videos(sav_dir, "manual"):
        if ref.video_id not in caps:
            continue
        seeds = [clips.clip_seed(SEED, ref.video_id, c) for c in range(CLIPS)]
        for c, e in enumerate(clips.make_examples(ref, caps[ref.video_id], config.data, seeds)):
            out[(ref.video_id, c)] = e
    return out


def _by_key(source):
    out = {}
    for i in range(len(source)):
        e = tfds_sav.to_example(source[i])
        out[(e["video_id"], e["clip"])] = e
    return out


def _fingerprint(example):
    h = hashlib.sha256()
    for k in sorted(example):
        a = np.asarray(example[k])
        h.update(f"{k}:{a.dtype.str}:{a.shape}".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def test_tfds_path_needs_no_tensorflow():
    # the whole module (build + data sources) runs in this venv, which has no TensorFlow
    assert importlib.util.find_spec("tensorflow") is None
    assert "tensorflow" not in sys.modules


def test_build_writes_array_record(built):
    from array_record.python.array_record_module import ArrayRecordReader

    files = sorted(glob.glob(os.path.join(built.data_dir, "sav_clips-train.array_record-*")))
    assert files, os.listdir(built.data_dir)
    with open(os.path.join(built.data_dir, "dataset_info.json")) as f:
        assert json.load(f)["fileFormat"] == "array_record"
    total = 0
    for p in files:  # plain ArrayRecord files: the raw reader counts every example
        r = ArrayRecordReader(p)
        total += r.num_records()
        r.close()
    assert total == N * CLIPS == built.info.splits["train"].num_examples
    assert os.path.basename(os.path.dirname(os.path.dirname(built.data_dir))) == "sav_clips"
    assert os.path.basename(os.path.dirname(built.data_dir)) == "tiny"


def test_records_equal_make_examples(built, expected):
    data_dir = os.path.dirname(os.path.dirname(os.path.dirname(built.data_dir)))
    source = tfds.data_source("sav_clips/tiny", data_dir=data_dir, split="train", download=False)
    got = _by_key(source)
    assert set(got) == set(expected)
    for key, e in expected.items():
        g = got[key]
        for k in ARRAYS:
            assert g[k].dtype == np.asarray(e[k]).dtype, (key, k)
            np.testing.assert_array_equal(g[k], e[k], err_msg=f"{key} {k}")
        for k in TEXTS:
            assert g[k] == e[k], (key, k)
        assert isinstance(g["caption"], str) and isinstance(g["local_prompts"][0], str)


def test_uncaptioned_video_skipped_and_counted(built, sav_dir):
    refs = sav.find_videos(sav_dir, "manual")
    missing = refs[-1].video_id
    reread = tfds_sav.builder_from_folder(built.data_dir)  # the counts are saved with the dataset
    meta = reread.info.metadata
    assert meta["skipped"] == {"missing_caption": 1}
    assert meta["videos_ok"] == N and meta["num_records"] == N * CLIPS
    assert meta["seed"] == SEED and meta["clips_per_video"] == CLIPS
    assert missing not in {k[0] for k in _by_key(built.as_data_source("train"))}


def test_rebuild_with_other_seed_refused(built, sav_dir, config):
    data_dir = os.path.dirname(os.path.dirname(os.path.dirname(built.data_dir)))
    with pytest.raises(ValueError, match="seed=3.*seed=4"):
        tfds_sav.build(sav_dir, os.path.join(sav_dir, synthetic.CAPTIONS_FILE), data_dir, config, seed=SEED + 1,
                       clips_per_video=CLIPS)


def test_data_source_pickles_for_grain_workers(built):
    src = tfds_sav.data_source(built.data_dir)
    again = pickle.loads(pickle.dumps(src))
    assert len(again) == len(src)
    np.testing.assert_array_equal(again[len(src) - 1]["video"], src[len(src) - 1]["video"])


def test_manual_dir_build_is_deterministic(built, sav_dir, tmp_path, caplog):
    """SA-V + captions from DownloadConfig(manual_dir): bit-identical array_record files to the first build."""
    b = tfds_sav.SavClips(data_dir=str(tmp_path), config="tiny", seed=SEED, clips_per_video=CLIPS,
                          file_format="array_record")
    with caplog.at_level(logging.WARNING):
        b.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=sav_dir))
    # the skip is logged with the file it concerns and its reason, never silent
    skipped = sav.find_videos(sav_dir, "manual")[-1].video_id
    assert any(skipped in r.getMessage() and "missing_caption" in r.getMessage() for r in caplog.records)
    names = sorted(os.path.basename(p) for p in glob.glob(os.path.join(b.data_dir, "*.array_record-*")))
    assert names == sorted(os.path.basename(p) for p in glob.glob(os.path.join(built.data_dir, "*.array_record-*")))
    for n in names:
        with open(os.path.join(b.data_dir, n), "rb") as f1, open(os.path.join(built.data_dir, n), "rb") as f2:
            assert f1.read() == f2.read(), n


def test_builder_configs(config):
    assert tfds_sav.builder_config(config.data) == "tiny"
    d = config_lib.build(2, "tiny").data
    d.num_frames = 5
    custom = tfds_sav.builder_config(d)
    assert custom.name.startswith("custom_") and custom.data["num_frames"] == 5
    d.crop = "random"  # any setting that changes the records changes the name
    assert tfds_sav.builder_config(d).name != custom.name
    mid = tfds_sav.SavClips(config="mid").info.features["video"]
    assert mid.shape == (17, 128, 128, 3) and mid.np_dtype == np.uint8
    with pytest.raises(FileNotFoundError, match="--format=tfds"):
        tfds_sav.builder_from_folder(ROOT)


def test_grain_pipeline_reads_tfds_folder(built, sav_dir, config, tmp_path):
    """Training from the TFDS folder: the batch contract, and the same decoded examples as a `prepare` folder."""
    cfg = config_lib.build(2, "tiny")
    cfg.data.prepared_path = built.data_dir
    cfg.train.batch_size = 2
    batch = next(loader.make_train_iterator(cfg, process_index=0, process_count=1, workdir=str(tmp_path)))
    t, h, w, k = cfg.data.num_frames, cfg.data.height, cfg.data.width, cfg.data.max_objects
    lc, lp = cfg.text_encoder.max_length, cfg.text_encoder.local_max_length
    want = {"video": ((2, t, h, w, 3), np.uint8), "trajectory": ((2, t, h, w, 3), np.uint8),
            "object_masks": ((2, t, h, w, k), np.bool_), "num_objects": ((2,), np.int32),
            "caption_tokens": ((2, lc), np.int32), "caption_mask": ((2, lc), np.bool_),
            "motion_tokens": ((2, lc), np.int32), "motion_mask": ((2, lc), np.bool_),
            "local_tokens": ((2, k + 1, lp), np.int32), "local_mask": ((2, k + 1, lp), np.bool_)}
    assert {n: (v.shape, v.dtype) for n, v in batch.items()} == want
    # one epoch from each folder: the same multiset of decoded + tokenized examples (every field, every byte)
    ref_dir = str(tmp_path / "records")
    prepare.prepare(sav_dir, os.path.join(sav_dir, synthetic.CAPTIONS_FILE), ref_dir, config, seed=SEED,
                    clips_per_video=CLIPS)
    assert len(records.shard_paths(ref_dir)) >= 1
    epochs = []
    for path in (built.data_dir, ref_dir):
        ds = loader.make_dataset(cfg, path)
        epochs.append(collections.Counter(_fingerprint(ds[i]) for i in range(N * CLIPS)))
    assert epochs[0] == epochs[1]
    assert len(epochs[0]) >= N  # at least the videos differ (two clips of a video may coincide)
    cfg.data.num_frames = 5  # the folder's clip shape is checked against the config
    with pytest.raises(ValueError, match=r"metadata.json: records were prepared with data.num_frames=9"):
        loader.make_dataset(cfg, built.data_dir)


def test_prepare_cli_format_tfds(sav_dir, tmp_path):
    out = str(tmp_path / "data")
    cmd = [sys.executable, "-m", "ttm_jax.data.prepare", "--format=tfds", f"--sav={sav_dir}",
           f"--captions={os.path.join(sav_dir, synthetic.CAPTIONS_FILE)}", f"--out={out}",
           f"--config={os.path.join(ROOT, 'configs', 'stage2.py')}:tiny", f"--seed={SEED}"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    folder = os.path.join(out, "sav_clips", "tiny", "1.0.0")
    assert f"prepared {N} records into {folder}" in p.stdout
    assert "videos: 3 ok, 1 skipped (missing_caption=1)" in p.stdout
    assert len(tfds_sav.data_source(folder)) == N
    bad = subprocess.run(cmd + ["--latents"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert bad.returncode != 0 and "--format=records" in bad.stderr
