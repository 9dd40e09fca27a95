"""The SA-V TFDS build on Apache Beam (DirectRunner): the same records as the single-process build, record for record,
skips as Beam counters read back into the same metadata, and the command line's --beam_pipeline_options."""

import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from sample_data import synthetic_sav_without_last_caption

beam = pytest.importorskip("apache_beam")

from ttm_jax import config as config_lib  # noqa: E402
from ttm_jax.data import beam_sav, synthetic, tfds_sav  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N = 4  # captioned synthetic videos; plus one without a caption line and one json without its mp4
SEED, CLIPS = 5, 2
DIRECT = "runner=DirectRunner,direct_num_workers=1"
# worker processes: the transforms and their elements pickle and run outside the launching process, as on a cluster
DIRECT_PROCESSES = "runner=DirectRunner,direct_num_workers=2,direct_running_mode=multi_processing"


@pytest.fixture(scope="module")
def config():
    return config_lib.validate(config_lib.build(2, "tiny"))


@pytest.fixture(scope="module")
def sav_dir(tmp_path_factory):
    out = synthetic_sav_without_last_caption(str(tmp_path_factory.mktemp("sav")), N + 1, frames=40)
    with tarfile.open(os.path.join(out, "sav_000.tar")) as tar:
        ann = tar.extractfile("sav_000/sav_000001_manual.json").read()
    os.makedirs(os.path.join(out, "loose"))
    with open(os.path.join(out, "loose", "sav_000099_manual.json"), "wb") as f:
        f.write(ann.replace(b"sav_000001", b"sav_000099"))
    return out


def _build(sav_dir, config, data_dir, beam_options):
    return tfds_sav.build(sav_dir, os.path.join(sav_dir, synthetic.CAPTIONS_FILE), str(data_dir), config, seed=SEED,
                          clips_per_video=CLIPS, beam_options=beam_options)


@pytest.fixture(scope="module")
def single(sav_dir, config, tmp_path_factory):
    return _build(sav_dir, config, tmp_path_factory.mktemp("single"), None)


@pytest.fixture(scope="module")
def on_beam(sav_dir, config, tmp_path_factory):
    return _build(sav_dir, config, tmp_path_factory.mktemp("beam"), DIRECT)


def test_beam_records_equal_single_process_records(single, on_beam):
    a, b = single.as_data_source("train"), on_beam.as_data_source("train")
    assert len(a) == len(b) == N * CLIPS
    keys = set()
    for i in range(len(a)):  # record for record, in the same order
        ra, rb = tfds_sav.to_example(a[i]), tfds_sav.to_example(b[i])
        assert set(ra) == set(rb)
        for k, v in ra.items():
            if isinstance(v, np.ndarray):
                assert rb[k].dtype == v.dtype and rb[k].shape == v.shape, (i, k)
                np.testing.assert_array_equal(rb[k], v, err_msg=f"record {i} {k}")
            else:
                assert rb[k] == v, (i, k)
        keys.add((ra["video_id"], ra["clip"]))
    assert len(keys) == N * CLIPS and {c for _, c in keys} == set(range(CLIPS))
    assert on_beam.info.splits["train"].shard_lengths == single.info.splits["train"].shard_lengths


def test_beam_skips_are_counted_into_the_metadata(single, on_beam):
    meta = tfds_sav.builder_from_folder(on_beam.data_dir).info.metadata  # saved with the dataset
    want = tfds_sav.builder_from_folder(single.data_dir).info.metadata
    # missing_caption: a Beam counter of ReadAnnotation; missing_file: found on the launching host
    assert meta["skipped"] == want["skipped"] == {"missing_caption": 1, "missing_file": 1}
    for k in ("videos_ok", "num_records", "seed", "clips_per_video", "data", "latents"):
        assert meta[k] == want[k], k
    assert meta["videos_ok"] == N and meta["num_records"] == N * CLIPS


def test_counters_of_a_pipeline(sav_dir, config):
    """The transforms alone, on a pipeline of our own: the counters say what was skipped and why."""
    from ttm_jax.data import captions as captions_lib
    from ttm_jax.data import sav

    refs = sav.find_videos(sav_dir, "manual")
    caps = captions_lib.load_captions(os.path.join(sav_dir, synthetic.CAPTIONS_FILE))
    p = beam.Pipeline(options=beam_sav.pipeline_options(DIRECT))
    _ = p | beam_sav.clips_transform(refs[:2] + refs[-1:], caps, config.data, seed=SEED, clips_per_video=1)
    result = p.run()
    result.wait_until_finish()
    assert beam_sav.counts(result) == (2, 2, {"missing_caption": 1})


def test_pipeline_options_spellings():
    opts = beam_sav.pipeline_options("runner=DirectRunner, direct_num_workers=2")
    assert opts.get_all_options()["runner"] == "DirectRunner"
    assert opts.get_all_options()["direct_num_workers"] == 2
    assert beam_sav.pipeline_options(opts) is opts
    assert beam_sav.pipeline_options(["--runner=DirectRunner"]).get_all_options()["runner"] == "DirectRunner"


def test_prepare_cli_on_beam(sav_dir, on_beam, tmp_path):
    out = str(tmp_path / "data")
    cmd = [sys.executable, "-m", "ttm_jax.data.prepare", "--format=tfds", f"--sav={sav_dir}",
           f"--captions={os.path.join(sav_dir, synthetic.CAPTIONS_FILE)}", f"--out={out}",
           f"--config={os.path.join(ROOT, 'configs', 'stage2.py')}:tiny", f"--seed={SEED}",
           f"--clips_per_video={CLIPS}", f"--beam_pipeline_options={DIRECT_PROCESSES}"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    folder = os.path.join(out, "sav_clips", "tiny", "1.0.0")
    assert f"prepared {N * CLIPS} records into {folder}" in p.stdout
    assert f"videos: {N} ok, 2 skipped (missing_caption=1, missing_file=1)" in p.stdout
    got, want = tfds_sav.data_source(folder), on_beam.as_data_source("train")
    assert len(got) == len(want) == N * CLIPS
    for i in range(len(got)):
        for k in ("video", "object_masks", "video_id", "clip"):
            np.testing.assert_array_equal(got[i][k], want[i][k], err_msg=f"record {i} {k}")
    bad = subprocess.run(cmd[:1] + [c for c in cmd[1:] if c != "--format=tfds"], capture_output=True, text=True,
                         timeout=300, cwd=ROOT)
    assert bad.returncode != 0 and "--format=tfds" in bad.stderr
