"""SA-V reading on the REAL sample annotations: sizes, frame counts, stride, masklet_size_abs; tar and folder layouts
(flat, nested) give the same videos; each malformed json is a SkipVideo naming the file, counted by reason; the
val/test JPEG + PNG layout reads into the same Annotation."""

import copy
import io
import json
import logging
import math
import os
import tarfile

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from sample_data import SAV_SAMPLE, needs_sample

from ttm_jax.data import sav, video_io
from ttm_jax.data.sav import SkipVideo

SAMPLE = SAV_SAMPLE
MANUAL = os.path.join(SAMPLE, "sav_000001_manual.json")
AUTO = os.path.join(SAMPLE, "sav_000001_auto.json")
pytestmark = needs_sample("sav_000001_manual.json", "sav_000001_auto.json")


def _ref(vid="sav_000001", **jsons):
    return sav.VideoRef(vid, sav.Source(f"/nowhere/{vid}.mp4"), tuple((k, sav.Source(p)) for k, p in jsons.items()))


@pytest.fixture(scope="module")
def real():
    with open(MANUAL) as f:
        manual = json.load(f)
    with open(AUTO) as f:
        auto = json.load(f)
    return manual, auto


@pytest.fixture(scope="module")
def manual_ann():
    return sav.read_annotation(_ref(manual=MANUAL))


@pytest.fixture(scope="module")
def decoded_areas(manual_ann):
    """int [121, 5] mask areas from decoding every RLE."""
    areas = []
    for j in range(manual_ann.num_annotated):  # one frame at a time: the whole video's masks are 246 MB
        m = manual_ann.masks([j])
        assert m.shape == (1, 848, 480, 5) and m.dtype == bool
        areas.append(m.reshape(-1, 5).sum(0))
    return np.stack(areas)


def test_masks_are_pycocotools_decodes_at_the_asked_positions_and_masklets(manual_ann):
    pos, ms = [7, 0, 7, 60], [4, 1, 3]
    m = manual_ann.masks(pos, ms)
    assert m.shape == (4, 848, 480, 3) and m.dtype == bool
    for i, j in enumerate(pos):
        for c, k in enumerate(ms):
            np.testing.assert_array_equal(m[i, ..., c], mask_utils.decode(manual_ann.rles[j][k]).astype(bool))
    assert manual_ann.masks([3], []).shape == (1, 848, 480, 0)


def test_real_manual_annotation_geometry(manual_ann, decoded_areas, real):
    a = manual_ann
    assert (a.height, a.width) == (848, 480)  # portrait: H > W, as the json's video_height / video_width say
    assert a.video_frame_count == 483 and a.num_annotated == 121
    assert a.stride == 4 and a.fps == pytest.approx(24.0)
    np.testing.assert_array_equal(a.annotated_frames, np.arange(0, 481, 4))
    assert a.annotated_frames[-1] < a.video_frame_count
    assert a.masklet_keys == [str(i) for i in real[0]["masklet_id"]]
    # the decoded masks agree with the RLE areas, and visibility with the json's masklet_first_appeared_frame
    np.testing.assert_array_equal(decoded_areas, a.areas())
    first_visible = np.argmax(decoded_areas > 0, axis=0)
    np.testing.assert_array_equal(first_visible, np.asarray(real[0]["masklet_first_appeared_frame"], int))


def _mean_visible_area(area):
    vis = area > 0
    return np.where(vis.any(0), area.sum(0) / np.maximum(vis.sum(0), 1), 0)


def test_masklet_size_abs_is_the_mean_visible_area(manual_ann, decoded_areas):
    """masklet_size_abs is the mean area over the annotated frames where the masklet is visible (not over all
    frames: masklet 3 of the manual file is visible in 8 of 121 frames, where the two differ 15-fold)."""
    area = decoded_areas.astype(float)
    rel = _mean_visible_area(area) / manual_ann.size_abs
    np.testing.assert_allclose(rel, 1.0, rtol=0.01)
    over_all = area.mean(0) / manual_ann.size_abs
    assert over_all.min() < 0.5  # the other reading would be wrong for masklet 3
    auto = sav.read_annotation(_ref(auto=AUTO))
    assert auto.num_masklets == 9 and auto.stride == 4 and (auto.height, auto.width) == (848, 480)
    np.testing.assert_allclose(_mean_visible_area(auto.areas()) / auto.size_abs, 1.0, rtol=0.01)
    sub = auto.masks([0, 60, 120])
    np.testing.assert_array_equal(sub.sum((1, 2)), auto.areas()[[0, 60, 120]])


def test_both_annotations_merge_manual_first_and_drop_auto_duplicates(tmp_path, real):
    both = sav.read_annotation(_ref(manual=MANUAL, auto=AUTO))
    assert both.masklet_keys == [str(i) for i in range(5)] + [f"auto:{i}" for i in range(9)]
    auto = copy.deepcopy(real[1])
    for row, mrow in zip(auto["masklet"], real[0]["masklet"], strict=True):
        row[2] = mrow[1]  # auto masklet 2 is manual masklet 1 again
    p = tmp_path / "sav_000001_auto.json"
    p.write_text(json.dumps(auto))
    dedup = sav.read_annotation(_ref(manual=MANUAL, auto=str(p)))
    assert "auto:2" not in dedup.masklet_keys and len(dedup.masklet_keys) == 13
    m = dedup.masks([5])
    np.testing.assert_array_equal(m[..., 5:], both.masks([5])[..., [5, 6, 8, 9, 10, 11, 12, 13]])


@pytest.mark.parametrize("stride", [1, 2, 3, 4, 5, 8])
def test_derive_stride(stride):
    for frames in range(max(2, stride + 1), 300, 7):
        n = math.ceil(frames / stride)  # every stride-th frame annotated
        s = sav.derive_stride(frames, n)
        assert (n - 1) * s <= frames - 1 < n * s  # the derived stride lays n annotations over the video
        if frames > 4 * stride * stride:  # long videos: unique, the true stride
            assert s == stride
    assert sav.derive_stride(483, 121) == 4
    with pytest.raises(SkipVideo, match="x.json") as e:
        sav.derive_stride(483, 50, file="x.json")
    assert e.value.reason == "frame_count"


# ------------------------------------------------------------------------------------------------------ layouts

def _tiny_mp4(seed):
    frames = np.random.default_rng(seed).integers(0, 255, size=(2, 16, 16, 3), dtype=np.uint8)
    return video_io.encode_video(frames, 24.0)


@pytest.fixture(scope="module")
def files(real):
    """{relative name: bytes} of two videos, as a released shard holds them."""
    out = {}
    for i, vid in enumerate(("sav_000001", "sav_000002")):
        out[f"{vid}.mp4"] = _tiny_mp4(i)
        for kind, d in (("manual", real[0]), ("auto", real[1])):
            d = dict(d, video_id=vid)
            out[f"{vid}_{kind}.json"] = json.dumps(d).encode()
    return out


def _write_tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _content(refs):
    return [(r.video_id, r.video.read_bytes(), tuple((k, s.read_bytes()) for k, s in r.annotations)) for r in refs]


def test_tar_and_folder_layouts_give_the_same_videos(tmp_path, files, caplog):
    flat = tmp_path / "flat"
    flat.mkdir()
    for n, b in files.items():
        (flat / n).write_bytes(b)
    nested = tmp_path / "nested"
    for n, b in files.items():
        sub = nested / "sav_000" / ("a" if "000001" in n else "b/c")
        sub.mkdir(parents=True, exist_ok=True)
        (sub / n).write_bytes(b)
    (nested / "README.md").write_text("not a video")
    shard = tmp_path / "sav_000.tar"
    foreign = {"sav_000/README.txt": b"x", "sav_000/._sav_000001.mp4": b"mac", "sav_000/sav_000001.jpg": b"j"}
    _write_tar(shard, {**{f"sav_000/{n}": b for n, b in files.items()}, **foreign})
    shards = tmp_path / "shards"
    shards.mkdir()
    _write_tar(shards / "sav_000.tar", {n: files[n] for n in files if "000001" in n})
    _write_tar(shards / "sav_001.tar", {n: files[n] for n in files if "000002" in n})

    counter = sav.SkipCounter()
    with caplog.at_level(logging.INFO):
        layouts = {
            "flat": sav.find_videos(flat, "both", counter=counter),
            "nested": sav.find_videos(str(nested), "both", counter=counter),
            "tar": sav.find_videos(shard, "both", counter=counter),
            "tar folder": sav.find_videos(shards, "both", counter=counter),
            "tar list": sav.find_videos([shards / "sav_001.tar", shards / "sav_000.tar"], "both", counter=counter),
            "unpacked and shard": sav.find_videos([flat, shard], "both", counter=counter),
        }
    assert counter.total == 0  # foreign members are not skipped videos
    assert "ignored 3 files" in caplog.text  # ... but they are logged
    assert "second copy" in caplog.text  # a video both unpacked and in a shard is taken once
    assert all(r.video.member == "" for r in layouts["unpacked and shard"])  # the first copy named
    want = [("sav_000001", files["sav_000001.mp4"],
             (("manual", files["sav_000001_manual.json"]), ("auto", files["sav_000001_auto.json"]))),
            ("sav_000002", files["sav_000002.mp4"],
             (("manual", files["sav_000002_manual.json"]), ("auto", files["sav_000002_auto.json"])))]
    for name, refs in layouts.items():
        assert _content(refs) == want, name
    tar_refs = layouts["tar"]
    assert tar_refs[0].video.member == "sav_000/sav_000001.mp4" and str(shard) in tar_refs[0].video.name
    # reading through a tar member and through a file gives the same annotation and frames
    a, b = sav.read_annotation(tar_refs[1]), sav.read_annotation(layouts["flat"][1])
    assert a.masklet_keys == b.masklet_keys and a.rles == b.rles
    np.testing.assert_array_equal(sav.read_frames(tar_refs[1], [1, 0]), sav.read_frames(layouts["nested"][1], [1, 0]))


def test_truncated_shard_keeps_whole_members_and_skips_the_cut_one(tmp_path, files, caplog):
    shard = tmp_path / "sav_000.tar"
    order = sorted(files, key=lambda n: n == "sav_000002.mp4")  # the cut member last
    _write_tar(shard, {n: files[n] for n in order})
    with tarfile.open(shard) as tar:
        cut_member = tar.getmember("sav_000002.mp4")
    shard.write_bytes(shard.read_bytes()[: cut_member.offset_data + cut_member.size // 2])
    counter = sav.SkipCounter()
    with caplog.at_level(logging.WARNING):
        refs = sav.find_videos(shard, "manual", counter=counter)
    assert "tar read stopped" in caplog.text and counter.total == 0
    assert [r.video_id for r in refs] == ["sav_000001", "sav_000002"]
    assert refs[0].video.read_bytes() == files["sav_000001.mp4"]
    assert sav.read_annotation(refs[1]).num_masklets == 5  # its json is whole
    # listed from its header, but its data is cut: reading it is a skip naming the member
    with pytest.raises(SkipVideo, match="sav_000.tar:sav_000002.mp4") as e:
        sav.read_frames(refs[1], [0])
    assert e.value.reason == "truncated_tar"


def test_missing_json_is_a_counted_skip(tmp_path, files):
    for n, b in files.items():
        if n != "sav_000002_auto.json":
            (tmp_path / n).write_bytes(b)
    counter = sav.SkipCounter()
    assert [r.video_id for r in sav.find_videos(tmp_path, "manual", counter=counter)] == ["sav_000001", "sav_000002"]
    assert [r.video_id for r in sav.find_videos(tmp_path, "auto", counter=counter)] == ["sav_000001"]
    assert dict(counter.counts) == {"missing_file": 1} and "sav_000002" in counter.summary()
    with pytest.raises(ValueError, match="config.data.annotation"):
        sav.find_videos(tmp_path, "manaul")
    with pytest.raises(FileNotFoundError, match="config.data.sav_path"):
        sav.find_videos(tmp_path / "absent")


# ------------------------------------------------------------------------------------------------------ bad jsons

def _bad_cases(manual):
    def drop(field):
        d = copy.deepcopy(manual)
        del d[field]
        return d

    wrong_size = copy.deepcopy(manual)
    wrong_size["masklet"][7][2]["size"] = [480, 848]
    short_masklet = copy.deepcopy(manual)
    short_masklet["masklet"][30] = short_masklet["masklet"][30][:4]
    short_count = copy.deepcopy(manual)
    short_count["masklet_frame_count"][3] = 120
    few_frames = copy.deepcopy(manual)
    few_frames["masklet"] = few_frames["masklet"][:50]
    other = dict(manual, video_id="sav_000009")
    return {
        "rle_size": (json.dumps(wrong_size), "masklet 2 frame 7"),
        "missing_field": (json.dumps(drop("masklet")), "'masklet'"),
        "missing_field ": (json.dumps(drop("video_height")), "'video_height'"),
        "masklet_length": (json.dumps(short_masklet), "annotated frame 30 has 4 masklets"),
        "masklet_length ": (json.dumps(short_count), "masklet 3 has 120 frames"),
        "frame_count": (json.dumps(few_frames), "50 annotated frames"),
        "bad_json": (json.dumps(manual)[:-100], "not valid JSON"),
        "mismatch": (json.dumps(other), "sav_000009"),
    }


def test_each_bad_json_is_skipped_with_its_reason(tmp_path, real):
    counter = sav.SkipCounter()
    cases = _bad_cases(real[0])
    for i, (reason, (text, detail)) in enumerate(cases.items()):
        p = tmp_path / f"case{i}" / "sav_000001_manual.json"
        p.parent.mkdir()
        p.write_text(text)
        with pytest.raises(SkipVideo) as e:
            sav.read_annotation(_ref(manual=str(p)))
        assert e.value.reason == reason.strip(), (reason, str(e.value))
        assert str(p) in str(e.value) and detail in str(e.value)
        counter.add(e.value)
    want = {}
    for r in cases:
        want[r.strip()] = want.get(r.strip(), 0) + 1
    assert dict(counter.counts) == want and counter.total == len(cases)
    assert all(r in counter.summary() for r in want)


# ------------------------------------------------------------------------------------------------------ val layout

def test_val_layout_reads_pngs_into_the_same_annotation(tmp_path):
    vid = "sav_000123"
    h, w, frames = 32, 176, 9
    rng = np.random.default_rng(0)
    jdir = tmp_path / "JPEGImages_24fps" / vid
    jdir.mkdir(parents=True)
    for i in range(frames):
        img = video_io.stamp_frame_index(rng.integers(0, 255, (h, w, 3), dtype=np.uint8), i)
        Image.fromarray(img).save(jdir / f"{i:05d}.jpg", quality=95)
    truth = rng.random((3, h, w, 2)) < 0.3  # 3 annotated frames (0, 4, 8), 2 objects
    for o in range(2):
        odir = tmp_path / "Annotations_6fps" / vid / f"{o:03d}"
        odir.mkdir(parents=True)
        for j in range(3):
            Image.fromarray(truth[j, ..., o].astype(np.uint8) * 255).save(odir / f"{4 * j:05d}.png")
    refs = sav.find_frame_videos(tmp_path)
    assert [r.video_id for r in refs] == [vid] and refs[0].layout == "frames"
    a = sav.read_annotation(refs[0])
    assert (a.height, a.width, a.video_frame_count, a.stride, a.num_annotated) == (h, w, 9, 4, 3)
    assert a.masklet_keys == ["000", "001"]
    np.testing.assert_array_equal(a.masks(), truth)
    got = sav.read_frames(refs[0], [8, 0, 4])
    np.testing.assert_array_equal(video_io.read_frame_index(got), [8, 0, 4])
    with pytest.raises(SkipVideo, match=vid):
        sav.read_frames(refs[0], [9])
