"""Clips and examples: the REAL sample annotation with a generated 848x480 (H x W), 483-frame video whose frames carry
their index and their masks' colours, through reader, clip sampling and trajectory rendering, masks landing on the
right frames; captions sidecar; every bad input a counted SkipVideo naming its file."""

import json
import os

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from sample_data import SAV_SAMPLE, needs_sample

from ttm_jax import config as config_lib
from ttm_jax.data import captions, clips, sav, video_io
from ttm_jax.data import trajectory as tj
from ttm_jax.data.sav import SkipVideo

MANUAL = os.path.join(SAV_SAMPLE, "sav_000001_manual.json")
real_sample = needs_sample("sav_000001_manual.json")
STRIDE = 4


def _data_config(**kw):
    d = config_lib.build(2, "tiny").data
    d.update(kw)
    return d


@pytest.fixture(scope="module")
def real_video(tmp_path_factory):
    """A 483-frame 848x480 (H x W) mp4 paired with the real manual json: frame i shows the masks of its nearest
    annotated frame, masklet m in PALETTE[m + 1] (lower masklet on top), and its index stamped top-left."""
    ann = sav.read_annotation(sav.VideoRef("sav_000001", sav.Source(""), (("manual", sav.Source(MANUAL)),)))
    pos = np.clip(np.floor(np.arange(ann.video_frame_count) / STRIDE + 0.5), 0, ann.num_annotated - 1).astype(int)
    ids = {}

    def frames():  # streamed: the 483 frames are never all in memory
        for i, p in enumerate(pos):
            if p not in ids:
                ids[p] = tj.ids_from_masks(ann.masks([p])[0]).astype(np.uint8)  # [848, 480]
            yield video_io.stamp_frame_index(tj.render_ids(ids[p]), i)

    d = tmp_path_factory.mktemp("sav_real")
    (d / "sav_000001.mp4").write_bytes(video_io.encode_video(frames(), 24.0, crf=18))
    (d / "sav_000001_manual.json").write_bytes(open(MANUAL, "rb").read())
    (ref,) = sav.find_videos(d, "manual")
    return ref, ann, np.stack([ids[p] for p in range(ann.num_annotated)])


ENTRY = captions.CaptionEntry("sav_000001", "a caption", "things move", {})


def _object_ious(example, video_ids):
    """IoU per chosen object between the example's masks and the objects read back from its video pixels."""
    keys = [k for k in example["masklet_keys"] if k]
    out = []
    for slot, key in enumerate(keys):
        seen = video_ids == int(key) + 1
        want = example["object_masks"][..., slot]
        out.append((seen & want).sum() / max((seen | want).sum(), 1))
    return np.array(out)


@real_sample
@pytest.mark.parametrize("seed,crop", [(0, "center"), (3, "random")])
def test_masks_land_on_their_frames(real_video, seed, crop):
    ref, ann, _ = real_video
    d = _data_config(fps=6.0, height=128, width=128, max_objects=5, min_object_area=0.0, crop=crop)
    ex = clips.make_example(ref, ENTRY, d, seed)
    t, k = d.num_frames, d.max_objects
    assert ex["video"].shape == ex["trajectory"].shape == (t, 128, 128, 3)
    assert ex["object_masks"].shape == (t, 128, 128, k) and ex["object_masks"].dtype == bool
    assert ex["video_id"] == "sav_000001" and ex["frame_indices"].dtype == np.int32
    # at 6 fps every clip frame is an annotated frame, 4 video frames apart, and takes its own masks
    fi = ex["frame_indices"]
    np.testing.assert_array_equal(np.diff(fi), STRIDE)
    np.testing.assert_array_equal(ex["mask_frame_indices"], fi)
    # the decoded frames are the frames named, by the index stamped in their pixels
    raw = sav.read_frames(ref, fi)
    np.testing.assert_array_equal(video_io.read_frame_index(raw), fi)
    # trajectory = the palette rendering of the object masks; exclusive masks; first-frame masks are s0
    np.testing.assert_array_equal(ex["trajectory"], tj.render(ex["object_masks"]))
    assert ex["object_masks"].sum(-1).max() <= 1
    n = ex["num_objects"]
    assert ex["object_masks"][0, ..., :n].any((0, 1)).all()  # every chosen object is in s0
    assert not ex["object_masks"][..., n:].any()  # zero padding
    assert ex["local_prompts"] == [""] * k and len(ex["masklet_keys"]) == k
    # the object masks match the colours painted into those very frames (after the same crop and resize)
    ious = _object_ious(ex, tj.ids_from_trajectory(ex["video"], ann.num_masklets))
    print(f"seed {seed} {crop}: frames {fi[0]}..{fi[-1]}, objects {ex['masklet_keys']}, IoU vs pixels "
          f"{np.round(ious, 3)}")
    assert ex["num_objects"] >= 2 and ious.min() >= 0.9
    box = clips.crop_box(848, 480, 128, 128)
    assert box == (0.0, 184.0, 480.0, 664.0)  # portrait: the centred square
    centred = clips.resize_frames(raw, box, (128, 128))
    if crop == "random":  # a different box, the same alignment
        assert not np.array_equal(ex["video"], centred)
        return
    np.testing.assert_array_equal(ex["video"], centred)
    # ... and not those of the neighbouring annotated frame: the check can tell one annotation step apart
    keys = [int(k) for k in ex["masklet_keys"] if k]
    remap = np.zeros(ann.num_masklets + 1, np.int32)
    remap[np.array(keys) + 1] = np.arange(1, len(keys) + 1)
    all_ids = real_video[2]  # [121, 848, 480]: masklet m as m + 1, lower on top
    shifted = dict(ex, object_masks=tj.masks_from_ids(remap[clips.resize_ids(all_ids[fi // STRIDE + 1], box,
                                                                              (128, 128))], 5))
    worse = _object_ious(shifted, tj.ids_from_trajectory(ex["video"], ann.num_masklets))
    print(f"  with the next annotation's masks instead: IoU {np.round(worse, 3)}")
    assert worse.mean() < ious.mean() - 0.1


@real_sample
def test_twelve_fps_clip_starts_on_an_annotation(real_video):
    ref, ann, _ = real_video
    d = _data_config(height=64, width=64, fps=12.0)  # 9 frames at 12 fps (the full set's rate), K=4
    for seed in range(3):
        ex = clips.make_example(ref, ENTRY, d, seed)
        fi, mfi = ex["frame_indices"], ex["mask_frame_indices"]
        np.testing.assert_array_equal(np.diff(fi), 2)  # 24 -> 12 fps
        assert fi[0] % STRIDE == 0 and mfi[0] == fi[0]  # s0 is an exact annotation
        assert (mfi % STRIDE == 0).all() and np.abs(mfi - fi).max() <= STRIDE // 2
        assert 1 <= ex["num_objects"] <= 4
    same = clips.make_example(ref, ENTRY, d, 1)
    again, other = clips.make_examples(ref, ENTRY, d, [1, 2])  # one annotation read, the same examples
    for key in ("video", "trajectory", "object_masks", "frame_indices"):
        np.testing.assert_array_equal(same[key], again[key])
    assert not np.array_equal(same["frame_indices"], other["frame_indices"])


@real_sample
def test_local_prompts_pick_and_pad_objects(real_video):
    ref, _, _ = real_video
    entry = captions.CaptionEntry("sav_000001", "c", "m", {"4": "the fourth moves", "1": "the first moves", "2": "",
                                                           "0": "the zeroth moves"})
    # 112x64 keeps nearly the whole portrait frame
    ex = clips.make_example(ref, entry, _data_config(height=112, width=64, min_object_area=0.0), 0)
    # only masklets with a (non-empty) local prompt are candidates; masklet 4 lies inside masklet 1 in this video
    # (99.8% of its pixels), so under "lower id wins" it would never show: it is passed over. Slots follow masklet
    # order, '' padded to K.
    assert ex["masklet_keys"] == ["0", "1", "", ""]
    assert ex["local_prompts"] == ["the zeroth moves", "the first moves", "", ""]
    assert ex["num_objects"] == 2 and not ex["object_masks"][..., 2:].any()
    assert ex["object_masks"][0, ..., :2].any((0, 1)).all()


def test_clip_frame_indices_properties():
    rng = np.random.default_rng(0)
    for _ in range(200):
        stride = int(rng.integers(1, 6))
        n_ann = int(rng.integers(5, 80))
        frames = (n_ann - 1) * stride + int(rng.integers(1, stride + 1))
        fps = float(rng.choice([6.0, 8.0, 12.0, 16.0, 24.0]))
        t = int(rng.integers(1, 20))
        try:
            fi, pos = clips.clip_frame_indices(frames, stride, n_ann, t, fps, 24.0, rng)
        except SkipVideo as e:
            assert e.reason == "too_short" and round((t - 1) * 24.0 / fps) > frames - 1 - 0
            continue
        assert fi.shape == pos.shape == (t,) and fi[0] % stride == 0 and fi[-1] < frames
        np.testing.assert_allclose(fi - fi[0], np.arange(t) * 24.0 / fps, atol=0.5)
        assert (0 <= pos).all() and (pos < n_ann).all() and pos[0] * stride == fi[0]
        # each frame takes the nearest annotated frame (as near as any other)
        assert (np.abs(pos * stride - fi) <= np.abs(np.arange(n_ann)[None] * stride - fi[:, None]).min(1)).all()
    with pytest.raises(ValueError, match="config.data.fps"):
        clips.clip_frame_indices(100, 4, 25, 9, 30.0, 24.0, rng)


def test_crop_box_keeps_aspect_and_stays_inside():
    rng = np.random.default_rng(0)
    for h, w, oh, ow in [(848, 480, 64, 64), (480, 848, 480, 832), (720, 1280, 64, 128), (100, 100, 50, 25)]:
        for mode in ("center", "random"):
            left, top, right, bottom = clips.crop_box(h, w, oh, ow, mode=mode, rng=rng)
            assert 0 <= left and 0 <= top and right <= w + 1e-9 and bottom <= h + 1e-9
            assert (right - left) / (bottom - top) == pytest.approx(ow / oh)
            assert right - left == pytest.approx(w) or bottom - top == pytest.approx(h)  # the largest such box
    with pytest.raises(ValueError, match="config.data.crop"):
        clips.crop_box(10, 10, 5, 5, mode="middle")


# --------------------------------------------------------------------------------------------------- captions

def test_captions_sidecar_round_trip_and_errors(tmp_path):
    entries = [captions.CaptionEntry("sav_000002", "two", "m2", {"0": "a", "auto:3": "b"}),
               captions.CaptionEntry("sav_000001", "one", "m1", {}, category="animals")]
    p = tmp_path / "caps.jsonl"
    captions.write_captions(p, entries)
    loaded = captions.load_captions(p)
    assert list(loaded) == ["sav_000001", "sav_000002"]
    assert loaded["sav_000002"] == entries[0] and loaded["sav_000001"] == entries[1]
    lines = p.read_text().splitlines()
    bad = {
        "missing field": (lines + ['{"video_id": "x", "caption": "c", "motion_prompt": "m"}'], ":3: missing field"),
        "not json": (lines[:1] + ["{oops"] + lines[1:], ":2: not valid JSON"),
        "duplicate": (lines + lines[:1], ":3: video_id 'sav_000001' appears twice"),
        "prompt type": (['{"video_id": "x", "caption": "c", "motion_prompt": "m", "local_prompts": {"0": 1}}'],
                        ":1: field 'local_prompts'"),
    }
    for name, (content, where) in bad.items():
        q = tmp_path / f"{name.replace(' ', '_')}.jsonl"
        q.write_text("\n".join(content) + "\n")
        with pytest.raises(captions.CaptionsError, match=str(q) + where):
            captions.load_captions(q)
    assert captions.lookup(loaded, "sav_000001") is loaded["sav_000001"]
    with pytest.raises(SkipVideo) as e:
        captions.lookup(loaded, "sav_000003", file="shard.tar:sav_000003.mp4")
    assert e.value.reason == "missing_caption" and "sav_000003.mp4" in str(e.value)
    with pytest.raises(captions.CaptionsError, match="missing_captions='skip'"):
        captions.lookup(loaded, "sav_000003", missing="error")


# --------------------------------------------------------------------------------------------------- bad inputs

H, W, F, N_ANN = 32, 48, 33, 9  # 33 frames, every 4th annotated


def _json(vid, h=H, w=W, k=2):
    yy, xx = np.mgrid[:h, :w]
    rows = []
    for j in range(N_ANN):
        row = []
        for o in range(k):
            m = (np.abs(yy - 10 - 8 * o) < 5) & (np.abs(xx - 8 - 2 * j - 10 * o) < 6)
            rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
            row.append({"size": [h, w], "counts": rle["counts"].decode()})
        rows.append(row)
    return {"video_id": vid, "video_frame_count": F, "video_height": h, "video_width": w, "video_duration": F / 24,
            "masklet": rows, "masklet_id": list(range(k)), "masklet_frame_count": [N_ANN] * k}


def test_every_bad_input_is_a_counted_skip(tmp_path):
    good_mp4 = video_io.encode_video(np.full((F, H, W, 3), 90, np.uint8), 24.0)
    cases = {  # video id -> (reason, mp4 bytes, json or None for a broken one)
        "sav_000001": (None, good_mp4, _json("sav_000001")),
        "sav_000002": ("truncated_video", video_io.encode_video(np.full((12, H, W, 3), 90, np.uint8), 24.0),
                       _json("sav_000002")),
        "sav_000003": ("unreadable_video", good_mp4[: len(good_mp4) // 3], _json("sav_000003")),
        "sav_000004": ("rle_size", good_mp4, _json("sav_000004")),
        "sav_000005": ("missing_field", good_mp4, {k: v for k, v in _json("sav_000005").items() if k != "masklet_id"}),
        "sav_000006": ("masklet_length", good_mp4, _json("sav_000006")),
        "sav_000007": ("missing_caption", good_mp4, _json("sav_000007")),
        "sav_000008": ("size_mismatch", video_io.encode_video(np.full((F, H, W + 16, 3), 90, np.uint8), 24.0),
                       _json("sav_000008")),
    }
    cases["sav_000004"][2]["masklet"][3][1]["size"] = [H, W + 2]
    cases["sav_000006"][2]["masklet"][5].pop()
    for vid, (_, mp4, ann) in cases.items():
        (tmp_path / f"{vid}.mp4").write_bytes(mp4)
        (tmp_path / f"{vid}_manual.json").write_text(json.dumps(ann))
    caps = {vid: captions.CaptionEntry(vid, f"cap {vid}", "m", {}) for vid in cases if vid != "sav_000007"}
    d = _data_config(height=32, width=32, num_frames=5, fps=6.0, max_objects=3, min_object_area=0.0)

    counter = sav.SkipCounter()
    examples = {}
    for ref in sav.find_videos(tmp_path, "manual", counter=counter):
        try:
            entry = captions.lookup(caps, ref.video_id, file=ref.video.name)
            examples[ref.video_id] = clips.make_example(ref, entry, d, seed=0)
        except SkipVideo as e:
            reason = cases[ref.video_id][0]
            assert e.reason == reason, str(e)
            assert ref.video_id in str(e)  # the message names the file
            counter.add(e)
    assert list(examples) == ["sav_000001"]
    assert dict(counter.counts) == {r: 1 for r, _, _ in cases.values() if r}
    ex = examples["sav_000001"]
    assert ex["num_objects"] == 2 and ex["object_masks"].shape == (5, 32, 32, 3)
    assert ex["local_prompts"] == ["", "", ""] and ex["caption"] == "cap sav_000001"
