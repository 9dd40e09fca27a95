"""Labelling a collection of videos (`ttm_jax.data.label`) with tiny random Grounding DINO and SAM2 video models.

Random weights cannot pin what is found; these tests pin the wiring and the format: the detector sees the first
frame and the caption's object names, the tracker gets the detected boxes and the frames at SA-V's 6 fps stride, the
masks it returns are the RLEs the project's SA-V reader decodes (round trip), the stride is read back for 24 and
30 fps, the caption lines are re-keyed to the masklet ids, `prepare` takes the folder as it is, and runs resume.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tiny_segmenters as tiny
import torch
import train_fixtures as fx

from ttm_jax import config as config_lib
from ttm_jax.clients import segment
from ttm_jax.data import captions as captions_lib
from ttm_jax.data import label, prepare, prompt_plan, sav, synthetic, video_io

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ["the", "a", *synthetic.OBJECT_COLOURS, *synthetic.SHAPES, *synthetic.OBJECT_TEXTURES]
# (file, synthetic video index, fps, frames): an mp4 at SA-V's 24 fps, a 30 fps mp4, a 24 fps file re-encoded
VIDEOS = (("clip_a.mp4", 0, 24, 24), ("clip_c.mp4", 2, 30, 30), ("sub/clip_b.mov", 1, 24, 20))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Torch on one thread: on a shared 2-core machine its default thread pool is many times slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return (tiny.save_grounding_dino(str(root / "dino"), WORDS), tiny.save_sam2_video(str(root / "sam2v")))


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    """Plain videos (no annotations) and a captions sidecar for clip_a and clip_b (clip_c has none)."""
    root = tmp_path_factory.mktemp("collection")
    entries = []
    for name, index, fps, frames in VIDEOS:
        v = synthetic.make_video(5, index, split="multi", height=48, width=64, frames=frames)
        path = root / "videos" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        video_io.write_video(str(path), v.frames, fps, crf=12)
        vid = os.path.splitext(os.path.basename(name))[0]
        if vid != "clip_c":
            e = v.caption_entry
            entries.append(captions_lib.CaptionEntry(vid, e["caption"], e["motion_prompt"], e["local_prompts"]))
    captions_lib.write_captions(root / "captions.jsonl", entries)
    return str(root / "videos"), str(root / "captions.jsonl"), {e.video_id: e for e in entries}


class Recorder:
    """The real detector and tracker, keeping what went in and came out."""

    def __init__(self, detector_path, sam2_path):
        self.detector = segment.GroundingDino(detector_path)
        self.tracker = segment.Sam2Video(sam2_path)
        self.detections, self.tracks = [], []

    def detect(self, image, names):
        out = self.detector.detect(image, names)
        self.detections.append((image, list(names), out))
        return out

    def propagate(self, frames, boxes):
        out = self.tracker.propagate(frames, boxes)
        self.tracks.append((frames, np.asarray(boxes), out))
        return out


@pytest.fixture(scope="module")
def labelled(models, collection, tmp_path_factory):
    videos, captions, _ = collection
    rec = Recorder(*models)
    out = str(tmp_path_factory.mktemp("labelled"))
    summary = label.label_all(videos, out, rec.detect, rec.propagate, captions=captions, objects=["red square"],
                              threshold=0.0)
    return out, summary, rec


def test_every_video_is_labelled_in_sav_format(labelled, collection):
    out, summary, rec = labelled
    videos, _, entries = collection
    assert summary.line() == "videos: 3 labelled, 0 skipped"
    refs = {r.video_id: r for r in sav.find_videos(out)}
    assert sorted(refs) == ["clip_a", "clip_b", "clip_c"]
    by_id = {os.path.splitext(os.path.basename(n))[0]: (n, fps, frames) for n, _, fps, frames in VIDEOS}
    order = [v for v, _ in label.find_input_videos(videos)]
    assert order == ["clip_a", "clip_c", "clip_b"]  # sorted by path: the sub-folder last
    for (image, names, found), (frames, boxes, masks), vid in zip(rec.detections, rec.tracks, order, strict=True):
        name, fps, count = by_id[vid]
        stride = {24: 4, 30: 5}[fps]
        ann = sav.read_annotation(refs[vid])
        # the stride is read back from the json's duration; one annotated frame per `stride` video frames
        assert ann.stride == stride and ann.num_annotated == -(-count // stride) and ann.fps == pytest.approx(fps)
        # the tracker saw the video's frames at that stride, prompted with the detector's boxes on the first one
        want = video_io.read_frames(os.path.join(videos, name), np.arange(0, count, stride))
        np.testing.assert_array_equal(frames, want)
        np.testing.assert_array_equal(image, want[0])
        np.testing.assert_allclose(boxes, [d.box for d in found])
        # the names: the caption's local prompts' objects, else --objects
        if vid in entries:
            assert names == [prompt_plan.object_phrase(p) for p in entries[vid].local_prompts.values()]
        else:
            assert names == ["red square"]
        # RLE round trip: the reader decodes exactly the tracker's masks
        assert ann.masklet_keys == [str(k) for k in range(masks.shape[-1])]
        np.testing.assert_array_equal(ann.masks(), masks)
        with open(os.path.join(out, f"{vid}_manual.json")) as f:
            raw = json.load(f)
        assert raw["masklet_name"] == names and raw["video_frame_count"] == count
        areas = masks.sum(axis=(1, 2)).astype(float)  # [A, K]
        want = [areas[areas[:, k] > 0, k].mean() if (areas[:, k] > 0).any() else 0.0 for k in range(areas.shape[1])]
        assert raw["masklet_size_abs"] == pytest.approx(want)
    # an mp4 is copied byte for byte; another container is re-encoded (same frames, up to the codec)
    with open(os.path.join(videos, "clip_a.mp4"), "rb") as a, open(os.path.join(out, "clip_a.mp4"), "rb") as b:
        assert a.read() == b.read()
    reencoded = sav.read_frames(refs["clip_b"], [0, 19]).astype(int)
    original = video_io.read_frames(os.path.join(videos, "sub", "clip_b.mov"), [0, 19]).astype(int)
    assert np.abs(reencoded - original).mean() < 3


def test_caption_lines_are_keyed_by_masklet_id_and_prepare_takes_the_folder(labelled, collection, tmp_path):
    out, _, _ = labelled
    _, _, entries = collection
    written = captions_lib.load_captions(os.path.join(out, label.CAPTIONS_FILE))
    assert sorted(written) == ["clip_a", "clip_b"]  # clip_c has no caption line to carry over
    for vid, e in written.items():
        assert (e.caption, e.motion_prompt) == (entries[vid].caption, entries[vid].motion_prompt)
        # threshold 0: every object found, masklet k is the caption's object k
        assert e.local_prompts == {str(k): p for k, p in enumerate(entries[vid].local_prompts.values())}
    config = config_lib.validate(fx.tiny_at_12fps())
    summary = prepare.prepare(out, os.path.join(out, label.CAPTIONS_FILE), str(tmp_path / "prepared"), config)
    assert summary.line() == "videos: 2 ok, 1 skipped (missing_caption=1)"


def test_nothing_found_is_skipped_with_its_reason_and_runs_resume(models, collection, tmp_path):
    videos, captions, _ = collection
    rec = Recorder(*models)
    out = str(tmp_path / "strict")
    strict = label.label_all(videos, out, rec.detect, rec.propagate, captions=captions, threshold=1.01)
    assert strict.line() == "videos: 0 labelled, 3 skipped (missing_caption=1, nothing_found=2)"
    assert any("clip_a.mp4: no object found on the first frame at --threshold=1.01" in m
               for m in strict.skipped_videos)
    assert rec.tracks == [] and not os.path.exists(os.path.join(out, "clip_a_manual.json"))
    # resume: a finished video is not labelled again; one whose json is gone is, to the same json
    out = str(tmp_path / "resume")
    first = label.label_all(videos, out, rec.detect, rec.propagate, objects=["blue disc", "red square"],
                            threshold=0.0)
    assert first.labelled == 3
    with open(os.path.join(out, "clip_c_manual.json"), "rb") as f:
        before = f.read()
    os.remove(os.path.join(out, "clip_c_manual.json"))
    n = len(rec.tracks)
    again = label.label_all(videos, out, rec.detect, rec.propagate, objects=["blue disc", "red square"],
                            threshold=0.0)
    assert (again.labelled, again.already) == (1, 2) and len(rec.tracks) == n + 1
    with open(os.path.join(out, "clip_c_manual.json"), "rb") as f:
        assert f.read() == before


def test_command_line(models, collection, labelled, tmp_path):
    """The command line writes what the library wrote; without a model folder it names the flag."""
    videos, captions, _ = collection
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "ttm_jax.data.label", f"--videos={videos}", f"--out={out}", f"--captions={captions}",
           "--objects=red square", f"--detector_path={models[0]}", f"--sam2_path={models[1]}", "--threshold=0"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "videos: 3 labelled, 0 skipped" in done.stdout
    for vid in ("clip_a", "clip_b", "clip_c"):
        with open(out / f"{vid}_manual.json") as a, open(os.path.join(labelled[0], f"{vid}_manual.json")) as b:
            assert json.load(a) == json.load(b)
    shutil.rmtree(out)
    bad = subprocess.run(cmd[:-3] + ["--sam2_path=/nonexistent"], capture_output=True, text=True, timeout=120,
                         cwd=ROOT, env=env)
    assert bad.returncode != 0 and "--detector_path: empty" in bad.stderr + bad.stdout
