"""SA-V annotations that used to abort a preparation or feed it wrong clips are counted skips naming the json: a video
slower than `data.fps` (`low_fps`), a masklet list cut short without `masklet_frame_count` (`frame_count`, where the
stride read 23 instead of 4 and the masks landed on the wrong frames), a video with no masklets (`no_masklets`, a
0-object clip under a caption of several objects). Real files: synthetic SA-V written in the released format and
edited, and an edited copy of the real sample annotation; the good videos' records stay those of a clean folder."""

import copy
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import train_fixtures as fx
from sample_data import SAV_SAMPLE, needs_sample

from ttm_jax import config as config_lib
from ttm_jax.data import captions, clips, prepare, records, sav, synthetic, video_io
from ttm_jax.data.sav import SkipVideo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FRAMES = 48  # 12 annotated frames, every 4th
GOOD = ("sav_000001", "sav_000005")
LOW_FPS, CUT_SHORT, NO_MASKLETS = "sav_000002", "sav_000003", "sav_000004"
SLOW_FPS = 8.0  # below the tiny config's data.fps = 12


@pytest.fixture(scope="module")
def config():
    return config_lib.validate(fx.tiny_at_12fps())


def _low_fps(ann: dict) -> dict:
    return dict(ann, video_duration=ann["video_frame_count"] / SLOW_FPS)


def _cut_short(ann: dict) -> dict:
    """The first 3 of 12 annotated frames, no masklet_frame_count: 3 rows over 48 frames read as stride 23."""
    d = {k: v for k, v in ann.items() if k != "masklet_frame_count"}
    d["masklet"] = ann["masklet"][:3]
    return d


def _no_masklets(ann: dict, *, rows: bool = True) -> dict:
    """No objects: every per-masklet list empty (`rows`: one empty row per annotated frame, else no rows)."""
    d = copy.deepcopy(ann)
    k = len(ann["masklet_id"])
    for key, value in ann.items():
        if key.startswith("masklet_") and isinstance(value, list) and len(value) == k:
            d[key] = []
    d["masklet"] = [[] for _ in ann["masklet"]] if rows else []
    d["masklet_num"] = 0
    return d


EDITS = {LOW_FPS: _low_fps, CUT_SHORT: _cut_short, NO_MASKLETS: _no_masklets}
REASONS = {LOW_FPS: "low_fps", CUT_SHORT: "frame_count", NO_MASKLETS: "no_masklets"}


def _write_folder(out, videos, edits):
    os.makedirs(out, exist_ok=True)
    for v in videos:
        with open(os.path.join(out, f"{v.video_id}.mp4"), "wb") as f:
            f.write(video_io.encode_video(v.frames, synthetic.FPS, **synthetic.MP4_SETTINGS))
        ann = edits.get(v.video_id, lambda a: a)(v.annotation["manual"])
        with open(os.path.join(out, f"{v.video_id}_manual.json"), "w") as f:
            json.dump(ann, f)
    # every video keeps its caption: the one without masklets is still described as several objects
    with open(os.path.join(out, synthetic.CAPTIONS_FILE), "w") as f:
        f.writelines(json.dumps(v.caption_entry) + "\n" for v in videos)
    return out


@pytest.fixture(scope="module")
def videos():
    return [synthetic.make_video(5, i, split="multi", height=64, width=64, frames=FRAMES, with_auto=True)
            for i in range(5)]


@pytest.fixture(scope="module")
def folders(videos, tmp_path_factory):
    """(unpacked SA-V folder with the three bad videos, the same folder with only the good ones)."""
    root = tmp_path_factory.mktemp("bad_sav")
    bad = _write_folder(str(root / "all"), videos, EDITS)
    good = _write_folder(str(root / "good"), [v for v in videos if v.video_id in GOOD], {})
    return bad, good


def _refs(folder):
    return {r.video_id: r for r in sav.find_videos(folder, "manual")}


def _json_path(folder, vid):
    return os.path.join(folder, f"{vid}_manual.json")


def test_a_video_slower_than_data_fps_is_a_skip_naming_its_json(folders, videos, config):
    bad, _ = folders
    ref = _refs(bad)[LOW_FPS]
    entry = captions.CaptionEntry(**videos[1].caption_entry)
    ann = sav.read_annotation(ref)
    assert ann.fps == SLOW_FPS and ann.stride == 4  # its masklets still lie every 4th frame
    with pytest.raises(SkipVideo) as e:
        clips.make_example(ref, entry, config.data, 0)
    msg = str(e.value)
    assert e.value.reason == "low_fps" and e.value.file == _json_path(bad, LOW_FPS)
    assert _json_path(bad, LOW_FPS) in msg and "8 fps" in msg and "config.data.fps=12" in msg
    assert "video_frame_count / video_duration" in msg and "lower config.data.fps to at most 8" in msg
    assert f"drop video {LOW_FPS}" in msg
    # the fix it names works: at data.fps <= 8 the video makes clips
    slow = copy.deepcopy(config.data)
    slow.fps = 6.0
    ex = clips.make_example(ref, entry, slow, 0)
    assert ex["num_objects"] >= 1 and ex["video"].shape[0] == slow.num_frames


def test_a_masklet_list_cut_short_is_a_skip_not_stride_23(folders, videos, tmp_path):
    bad, _ = folders
    with open(_json_path(bad, CUT_SHORT)) as f:
        cut = json.load(f)
    assert "masklet_frame_count" not in cut and len(cut["masklet"]) == 3
    assert sav.derive_stride(FRAMES, 3) == 23  # what the largest whole stride reads: masks 23 frames apart, wrong
    with pytest.raises(SkipVideo) as e:
        sav.read_annotation(_refs(bad)[CUT_SHORT])
    msg = str(e.value)
    assert e.value.reason == "frame_count" and _json_path(bad, CUT_SHORT) in msg
    assert "3 annotated frames (len(masklet))" in msg and f"video_frame_count={FRAMES}" in msg
    assert "gives 12 annotated frames" in msg and "one frame in 23" in msg and "drop the video" in msg
    # the untouched videos of the same folder read as SA-V: every 4th frame
    for vid in GOOD:
        a = sav.read_annotation(_refs(bad)[vid])
        assert a.stride == 4 and a.num_annotated == 12
    # cut at any length, it is caught (the full list is 12 rows)
    for n in range(1, 12):
        p = os.path.join(tmp_path, f"{n}", f"{CUT_SHORT}_manual.json")
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "w") as f:
            json.dump(dict(cut, masklet=videos[2].annotation["manual"]["masklet"][:n]), f)
        ref = sav.VideoRef(CUT_SHORT, sav.Source(os.path.join(bad, f"{CUT_SHORT}.mp4")), (("manual", sav.Source(p)),))
        with pytest.raises(SkipVideo, match="frame_count"):
            sav.read_annotation(ref)


def test_a_short_video_keeps_the_sav_stride(videos, tmp_path):
    """12 frames annotated at 0, 4, 8: the largest stride that fits is 5 (masks claimed for frames 5 and 10, which
    are not annotated); the stride is SA-V's 4, and each annotated row is the mask of its frame."""
    v = synthetic.make_video(5, 0, split="multi", height=64, width=64, frames=12)
    folder = _write_folder(str(tmp_path), [v], {})
    assert sav.derive_stride(12, 3) == 5
    a = sav.read_annotation(_refs(folder)[v.video_id])
    assert a.stride == 4 and a.num_annotated == 3
    np.testing.assert_array_equal(a.annotated_frames, [0, 4, 8])
    np.testing.assert_array_equal(a.masks(), v.masks[a.annotated_frames])


@needs_sample("sav_000001_manual.json")
def test_the_real_annotation_cut_short_is_a_skip(tmp_path):
    """The real json (483 frames, 121 annotated) cut to 21 rows without masklet_frame_count read as stride 24."""
    with open(os.path.join(SAV_SAMPLE, "sav_000001_manual.json")) as f:
        real = json.load(f)
    p = tmp_path / "sav_000001_manual.json"
    p.write_text(json.dumps({k: (v[:21] if k == "masklet" else v) for k, v in real.items()
                             if k != "masklet_frame_count"}))
    ref = sav.VideoRef("sav_000001", sav.Source(str(tmp_path / "sav_000001.mp4")), (("manual", sav.Source(str(p))),))
    with pytest.raises(SkipVideo) as e:
        sav.read_annotation(ref)
    assert e.value.reason == "frame_count" and str(p) in str(e.value)
    assert "21 annotated frames" in str(e.value) and "gives 121" in str(e.value)


def test_a_video_without_masklets_is_a_skip(folders, videos, config, tmp_path):
    bad, _ = folders
    ref = _refs(bad)[NO_MASKLETS]
    entry = captions.CaptionEntry(**videos[3].caption_entry)
    assert len(entry.local_prompts) >= 2  # its caption describes several objects
    for rows in (True, False):  # an empty row per annotated frame, or no rows at all
        p = tmp_path / f"rows{rows}" / f"{NO_MASKLETS}_manual.json"
        p.parent.mkdir()
        p.write_text(json.dumps(_no_masklets(videos[3].annotation["manual"], rows=rows)))
        one = sav.VideoRef(NO_MASKLETS, ref.video, (("manual", sav.Source(str(p))),))
        with pytest.raises(SkipVideo) as e:
            clips.make_example(one, entry, config.data, 0)
        assert e.value.reason == "no_masklets" and str(p) in str(e.value)
        assert "masklet_id is empty" in str(e.value) and "drop the video" in str(e.value)
    # with annotation="both", an auto json that has masklets still makes the video usable (keys auto:<id>)
    auto = tmp_path / f"{NO_MASKLETS}_auto.json"
    auto.write_text(json.dumps(videos[3].annotation["auto"]))
    both = sav.VideoRef(NO_MASKLETS, ref.video, (ref.annotations[0], ("auto", sav.Source(str(auto)))))
    a = sav.read_annotation(both)
    k = len(videos[3].annotation["auto"]["masklet_id"])
    assert a.masklet_keys == [f"auto:{i}" for i in range(k)] and a.stride == 4 and a.num_annotated == 12
    assert ref.annotations[0][1].name in a.file and str(auto) in a.file


def _records(folder):
    return [r for p in records.shard_paths(folder) for r in records.read_shard(p)]


def test_prepare_counts_and_names_each_bad_video(folders, config, tmp_path):
    """The preparation no longer dies on a slow video: every bad video is counted and named, and the good videos'
    records are byte for byte those of a folder without the bad ones."""
    bad, good = folders
    out = str(tmp_path / "prep")
    s = prepare.prepare(bad, os.path.join(bad, synthetic.CAPTIONS_FILE), out, config, chunk_size=2)
    assert s.videos_ok == len(GOOD) and s.num_records == len(GOOD)
    assert s.skipped == {"frame_count": 1, "low_fps": 1, "no_masklets": 1}
    assert s.line() == "videos: 2 ok, 3 skipped (frame_count=1, low_fps=1, no_masklets=1)"
    assert len(s.skipped_videos) == 3
    for vid, message in zip(sorted(REASONS), s.skipped_videos, strict=True):
        assert message.startswith(_json_path(bad, vid) + ": ") and message.endswith(f"[{REASONS[vid]}]")
    manifest = records.load_manifest(out)
    assert manifest["skipped"] == s.skipped and manifest["skipped_videos"] == s.skipped_videos
    clean = str(tmp_path / "clean")
    prepare.prepare(good, os.path.join(good, synthetic.CAPTIONS_FILE), clean, config, chunk_size=2)
    got, want = _records(out), _records(clean)
    assert [records.decode(r)["video_id"] for r in got] == list(GOOD)
    assert got == want


def test_prepare_cli_prints_each_skipped_video(folders, tmp_path):
    bad, _ = folders
    out = str(tmp_path / "cli")
    cmd = [sys.executable, "-m", "ttm_jax.data.prepare", f"--sav={bad}",
           f"--captions={os.path.join(bad, synthetic.CAPTIONS_FILE)}", f"--out={out}",
           f"--config={os.path.join(ROOT, 'configs', 'stage2.py')}:tiny", "--config.data.fps=12", "--chunk_size=2"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.splitlines()
    assert lines[-1] == "videos: 2 ok, 3 skipped (frame_count=1, low_fps=1, no_masklets=1)"
    skipped = [line for line in lines if line.startswith("skipped ")]
    assert [line.split()[1].rstrip(":") for line in skipped] == [_json_path(bad, v) for v in sorted(REASONS)]
    assert "config.data.fps=12" in skipped[0] and "len(masklet)" in skipped[1] and "no masklets" in skipped[2]
    assert all(line.endswith(f"[{REASONS[v]}]") for line, v in zip(skipped, sorted(REASONS), strict=True))
