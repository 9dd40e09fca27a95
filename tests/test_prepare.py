"""Preparation to ArrayRecord: the records are the clips, a killed run resumes to the same records, skips counted."""

import os
import shutil
import signal
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import train_fixtures as fx
from sample_data import synthetic_sav_without_last_caption

from ttm_jax import config as config_lib
from ttm_jax import storage
from ttm_jax.assembly.registry import make_autoencoder
from ttm_jax.data import captions as captions_lib
from ttm_jax.data import clips, prepare, records, sav, synthetic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N = 7  # synthetic videos; plus one without a caption and one without its mp4


@pytest.fixture(scope="module")
def config():
    return config_lib.validate(fx.tiny_at_12fps())


@pytest.fixture(scope="module")
def sav_dir(tmp_path_factory):
    """Synthetic SA-V plus two broken videos: one with no caption line, one json with no mp4 beside it."""
    out = synthetic_sav_without_last_caption(str(tmp_path_factory.mktemp("sav")), N + 1, frames=24)
    with tarfile.open(os.path.join(out, "sav_000.tar")) as tar:
        ann = tar.extractfile("sav_000/sav_000001_manual.json").read()
    os.makedirs(os.path.join(out, "loose"))
    with open(os.path.join(out, "loose", "sav_000099_manual.json"), "wb") as f:
        f.write(ann.replace(b"sav_000001", b"sav_000099"))
    return out


def _all_records(folder):
    m = records.load_manifest(folder)
    return [r for p in records.shard_paths(folder, m) for r in records.read_shard(p)]


def _run_cli(sav_dir, out, *extra, env=None, captions=None):
    captions = captions or os.path.join(sav_dir, synthetic.CAPTIONS_FILE)
    cmd = [sys.executable, "-m", "ttm_jax.data.prepare", f"--sav={sav_dir}", f"--captions={captions}", f"--out={out}",
           f"--config={os.path.join(ROOT, 'configs', 'stage2.py')}:tiny", "--config.data.fps=12", "--chunk_size=2",
           *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})},
                          cwd=ROOT)


@pytest.fixture(scope="module")
def prepared(sav_dir, config, tmp_path_factory):
    """The uninterrupted reference run, with 2 worker processes."""
    out = str(tmp_path_factory.mktemp("prep_ref"))
    summary = prepare.prepare(sav_dir, os.path.join(sav_dir, synthetic.CAPTIONS_FILE), out, config, workers=2,
                              chunk_size=2)
    return out, summary


def test_records_are_the_clips(sav_dir, config, prepared):
    out, summary = prepared
    recs = [records.decode(r) for r in _all_records(out)]
    assert summary.num_records == len(recs) == N
    caps = captions_lib.load_captions(os.path.join(sav_dir, synthetic.CAPTIONS_FILE))
    refs = {r.video_id: r for r in sav.find_videos(sav_dir)}
    assert [r["video_id"] for r in recs] == sorted(caps)  # sorted by id, the uncaptioned one left out
    for rec in recs[:3]:
        want = clips.make_example(refs[rec["video_id"]], caps[rec["video_id"]], config.data,
                                  clips.clip_seed(0, rec["video_id"], 0))
        for key in ("video", "trajectory", "object_masks", "frame_indices", "mask_frame_indices"):
            assert rec[key].dtype == want[key].dtype and rec[key].shape == want[key].shape, key
            np.testing.assert_array_equal(rec[key], want[key], err_msg=key)
        for key in ("caption", "motion_prompt", "local_prompts", "num_objects", "video_id", "masklet_keys"):
            assert rec[key] == want[key], key
    d = config.data
    assert recs[0]["video"].shape == (d.num_frames, d.height, d.width, 3)
    assert recs[0]["object_masks"].shape == (d.num_frames, d.height, d.width, d.max_objects)


def test_summary_counts_skips_by_reason(prepared):
    _, summary = prepared
    assert summary.videos_ok == N
    assert summary.skipped == {"missing_caption": 1, "missing_file": 1}
    assert summary.line() == f"videos: {N} ok, 2 skipped (missing_caption=1, missing_file=1)"
    manifest = records.load_manifest(prepared[0])
    assert manifest["num_records"] == N and manifest["skipped"] == summary.skipped
    assert sum(s["num_records"] for s in manifest["shards"]) == N


def test_killed_preparation_resumes_to_the_same_records(sav_dir, prepared, tmp_path):
    out = str(tmp_path / "killed")
    # SIGKILL in the middle of the second chunk's shard (one record written to its temporary file)
    r = _run_cli(sav_dir, out, "--workers=1", env={prepare.KILL_ENV: "1"})
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    files = sorted(os.listdir(out))
    assert "records-00000.json" in files and "records-00001.json" not in files
    assert records.MANIFEST not in files and any(".tmp." in f for f in files)  # a torn shard was left behind
    with pytest.raises(records.RecordError, match="no manifest"):
        records.load_manifest(out)
    r = _run_cli(sav_dir, out, "--workers=1")
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"videos: {N} ok, 2 skipped (missing_caption=1, missing_file=1)" in r.stdout
    assert not any(".tmp." in f for f in os.listdir(out))
    got, want = _all_records(out), _all_records(prepared[0])
    assert len(got) == len(want) == N
    assert got == want  # byte-identical, same order: nothing duplicated, nothing missing
    m_got, m_want = records.load_manifest(out), records.load_manifest(prepared[0])
    assert m_got["shards"] == m_want["shards"]


def test_resuming_with_other_settings_is_an_error(sav_dir, config, prepared, tmp_path):
    out = str(tmp_path / "copy")
    shutil.copytree(prepared[0], out)
    with pytest.raises(ValueError, match=r"prepare\.json.*seed"):
        prepare.prepare(sav_dir, os.path.join(sav_dir, synthetic.CAPTIONS_FILE), out, config, chunk_size=2, seed=5)
    # same settings: nothing to redo, same manifest
    before = os.path.getmtime(os.path.join(out, "records-00000.array_record"))
    prepare.prepare(sav_dir, os.path.join(sav_dir, synthetic.CAPTIONS_FILE), out, config, chunk_size=2)
    assert os.path.getmtime(os.path.join(out, "records-00000.array_record")) == before


def test_cached_latents_are_the_clip_latents(sav_dir, config, tmp_path):
    out = str(tmp_path / "lat")
    one = str(tmp_path / "one")
    os.makedirs(one)
    shutil.copy(os.path.join(sav_dir, "sav_000.tar"), one)
    prepare.prepare(one, os.path.join(sav_dir, synthetic.CAPTIONS_FILE), out, config, chunk_size=4, latents=True,
                    make_autoencoder=make_autoencoder)
    recs = [records.decode(r) for r in _all_records(out)]
    ae = make_autoencoder(config.autoencoder)
    lt = config_lib.latent_shape(config)
    assert len(recs) == 4
    for rec in recs:
        for key in ("video", "trajectory"):
            lat = rec[f"{key}_latent"]
            assert lat.dtype == np.float32 and lat.shape == lt
            want = np.asarray(ae.encode(rec[key][None].astype(np.float32) / 127.5 - 1.0))[0]
            np.testing.assert_allclose(lat, want, atol=1e-6)
    assert records.load_manifest(out)["latents"]["name"] == config.autoencoder.name


def test_record_codecs_roundtrip():
    rng = np.random.default_rng(0)
    ex = {"video": rng.integers(0, 256, (3, 8, 6, 3), dtype=np.uint8),
          "trajectory": np.zeros((3, 8, 6, 3), np.uint8),
          "object_masks": rng.random((3, 8, 6, 5)) > 0.5,
          "frame_indices": np.arange(3, dtype=np.int32), "caption": "ünïcode ok", "local_prompts": ["a", ""],
          "num_objects": np.int64(2), "video_latent": rng.normal(size=(1, 2, 2, 4))}
    data = records.encode(ex)
    back = records.decode(data)
    for k in ("video", "trajectory", "object_masks", "frame_indices"):
        assert back[k].dtype == ex[k].dtype and back[k].shape == ex[k].shape
        np.testing.assert_array_equal(back[k], ex[k])
    assert back["video_latent"].dtype == np.float32
    assert (back["caption"], back["local_prompts"], back["num_objects"]) == ("ünïcode ok", ["a", ""], 2)
    assert len(data) < ex["video"].nbytes + ex["object_masks"].size // 8 + 2000  # masks packed, black traj zipped
    with pytest.raises(records.RecordError, match="ARRAY_FIELDS or META_FIELDS"):
        records.encode({**ex, "surprise": 1})
    with pytest.raises(records.RecordError, match="bad magic"):
        records.decode(b"JUNK" + data[4:])


def test_cli_reads_a_real_sav_layout_unpacked(sav_dir, tmp_path):
    """An unpacked, nested folder (sav_000/...) prepares as well as the tars, through the CLI."""
    src = tmp_path / "unpacked"
    with tarfile.open(os.path.join(sav_dir, "sav_001.tar")) as tar:
        for m in tar.getmembers():
            path = src / m.name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(tar.extractfile(m).read())
    r = _run_cli(str(src), str(tmp_path / "out"), "--workers=1",
                 captions=os.path.join(sav_dir, synthetic.CAPTIONS_FILE))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "videos: 3 ok, 1 skipped (missing_caption=1)" in r.stdout  # sav_000008 has no caption line
    ids = [records.decode(x)["video_id"] for x in _all_records(str(tmp_path / "out"))]
    assert ids == ["sav_000005", "sav_000006", "sav_000007"]


def test_only_dead_local_processes_tmp_files_are_stale(tmp_path):
    mine = os.path.basename(storage.tmp_name(str(tmp_path / "records-00000.array_record")))
    assert not storage.is_stale_tmp(mine)  # this process is alive: a concurrent writer's file is kept
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = mine.rsplit("-", 1)[0] + "-" + child.stdout.strip()
    assert storage.is_stale_tmp(dead)
    assert not storage.is_stale_tmp("records-00000.array_record.tmp.otherhost-" + child.stdout.strip())
    assert not storage.is_stale_tmp("records-00000.array_record")
