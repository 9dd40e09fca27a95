"""SA-V-128 builder: the selection follows its stated rule (checked against the synthetic generator's own motions and
the real sample's masklets), the folder round-trips against the source video and the RLEs, `--ids`, re-runs,
missing captions, and the requests the sampling job reads."""

import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from sample_data import SAV_SAMPLE, needs_sample

from ttm_jax.data import captions, clips, sav, synthetic, video_io
from ttm_jax.data import trajectory as tj
from ttm_jax.eval import sav128
from ttm_jax.eval import sav128_select as select
from ttm_jax.inference import requests as requests_lib

RULE = select.Rule(height=32, width=32, frames=9, fps=6.0)  # 33 source frames: the whole synthetic video
UNCAPTIONED = ("sav_000002", "sav_000007")
NUM = 3


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """24 synthetic SA-V videos (64x64, 33 frames), two without a caption line."""
    d = str(tmp_path_factory.mktemp("sav128_synth"))
    synthetic.generate(d, 24, seed=0, height=64, width=64, frames=33, videos_per_shard=8)
    caps = os.path.join(d, synthetic.CAPTIONS_FILE)
    with open(caps) as f:
        lines = [x for x in f.read().splitlines() if json.loads(x)["video_id"] not in UNCAPTIONED]
    with open(caps, "w") as f:
        f.write("\n".join(lines) + "\n")
    return d, caps


@pytest.fixture(scope="module")
def built(synth, tmp_path_factory):
    d, caps = synth
    out = str(tmp_path_factory.mktemp("sav128_out") / "bench")
    summary = sav128.build(d, caps, out, num_single=NUM, num_multi=NUM, rule=RULE)
    return d, caps, out, summary


def _scene(video_id):
    return synthetic.sample_scene(0, int(video_id.split("_")[1]) - 1, split="mixed", height=64, width=64, frames=33)


def _refs(d):
    return {r.video_id: r for r in sav.find_videos(d)}


def _own_area0(ann, rule):
    """Each masklet's share of the model frame at frame 0: RLE decoded, centre-cropped and resized (nearest)."""
    m = mask_utils.decode(ann.rles[0]).astype(np.uint8)  # [h, w, M]
    box = clips.crop_box(ann.height, ann.width, rule.height, rule.width)
    return clips.resize_ids(np.moveaxis(m, -1, 0), box, (rule.height, rule.width)).reshape(m.shape[-1], -1).mean(1)


def test_still_objects_never_move_and_travelling_ones_do(synth):
    d, _ = synth
    seen_still = seen_moving = 0
    for vid, ref in _refs(d).items():
        a = select.analyse(sav.read_annotation(ref), RULE)
        for o, m in zip(_scene(vid).objects, a.masklets, strict=True):
            if o.direction == "still" and o.scale_change == "none" and not o.spin:
                assert not m.moving, (vid, o, m)
                seen_still += 1
            elif o.direction != "still":
                assert m.moving and m.travel >= RULE.min_travel, (vid, o, m)
                seen_moving += 1
    assert seen_still >= 3 and seen_moving >= 20


def test_selection_follows_the_rule(built):
    d, caps, out, summary = built
    refs, entries = _refs(d), captions.load_captions(caps)
    cands = []
    for vid, ref in refs.items():
        if vid in entries:
            ann = sav.read_annotation(ref)
            a = select.analyse(ann, RULE, category=entries[vid].category)
            assert a == select.analyse(ann, RULE, category=entries[vid].category)  # deterministic
            large = _own_area0(ann, RULE) >= RULE.min_area
            np.testing.assert_array_equal([m.large for m in a.masklets], large)
            moving_large = [m.index for m in a.masklets if m.moving and m.large]
            if a.split == "single":
                assert moving_large == list(a.objects)  # exactly one moving, large-enough masklet
                (obj,) = a.objects
                assert _scene(vid).objects[obj].direction != "still" or _scene(vid).objects[obj].scale_change != "none"
            elif a.split == "multi":
                assert len(a.objects) >= 2 and set(a.objects) <= set(moving_large)
            else:
                assert not moving_large
            if a.split:
                assert a.score == pytest.approx(np.mean([a.masklets[k].speed for k in a.objects]))
            cands.append(a)
    m = summary.manifest
    got = {s: [e["video_id"] for e in m["videos"] if e["split"] == s] for s in select.SPLITS}
    for split in select.SPLITS:
        pool = [a for a in cands if a.split == split]
        assert m["candidates"][split] == len(pool)
        # categories take turns: round 0 holds the best of each category, by score
        best = {}
        for a in select.rank(pool):
            best.setdefault(a.category, a)
        first_round = [a.video_id for a in select.rank(list(best.values()))]
        assert got[split][:len(first_round)] == first_round[:NUM]
        assert got[split] == [a.video_id for a in select.balance(pool, NUM)]
    for e in m["videos"]:
        assert e["motion_score"] > 0 and all(o["moving"] and o["area0"] >= RULE.min_area for o in e["objects"])
    assert m["rule"]["parameters"] == RULE.to_json() and "10% of the diagonal" in m["rule"]["description"]


def test_balance_alternates_categories_and_breaks_ties_by_id():
    def a(vid, score, cat):
        return select.Analysis(vid, (0,), (0,), (0, 0, 1, 1), (), (1,), "single", score, cat)

    cands = [a("v1", 0.9, "x"), a("v2", 0.8, "x"), a("v3", 0.7, "x"), a("v4", 0.1, "y"), a("v0", 0.8, "x"),
             a("v5", 0.05, "y")]
    assert [c.video_id for c in select.balance(cands)] == ["v1", "v4", "v0", "v5", "v2", "v3"]
    assert [c.video_id for c in select.balance(cands, 3)] == ["v1", "v4", "v0"]
    no_cat = [a("b", 0.5, None), a("a", 0.5, None), a("c", 0.6, None)]
    assert [c.video_id for c in select.balance(no_cat)] == ["c", "a", "b"]


def test_missing_captions_are_skipped_and_counted(built):
    _, _, out, summary = built
    m = summary.manifest
    assert m["skipped"]["missing_caption"] == len(UNCAPTIONED)
    assert sum(vid in msg for vid in UNCAPTIONED for msg in m["skipped_videos"]) == len(UNCAPTIONED)
    assert not {e["video_id"] for e in m["videos"]} & set(UNCAPTIONED)
    assert "missing captions: 2" in summary.line()


def test_folder_round_trips(built):
    d, caps, out, summary = built
    refs, entries = _refs(d), captions.load_captions(caps)
    hw = (RULE.height, RULE.width)
    assert summary.manifest["selected"] == {"single": NUM, "multi": NUM}
    for e in summary.manifest["videos"]:
        folder = os.path.join(out, "videos", e["video_id"])
        ref = refs[e["video_id"]]
        ann = sav.read_annotation(ref)
        box = clips.crop_box(ann.height, ann.width, *hw)
        frame0 = clips.resize_frames(sav.read_frames(ref, [0]), box, hw)[0]
        first = np.asarray(Image.open(os.path.join(folder, "first_frame.png")))
        np.testing.assert_array_equal(first, frame0)
        clip = video_io.read_frames(os.path.join(folder, "video.mp4"))
        want = clips.resize_frames(sav.read_frames(ref, e["frame_indices"]), box, hw)
        assert clip.shape == (RULE.frames, *hw, 3)
        assert np.abs(clip.astype(int) - want.astype(int)).mean() < 4
        # ground truth: the objects' RLEs at each frame's annotated frame, decoded, exclusive, cropped and resized
        keys = [o["masklet_key"] for o in e["objects"]]
        cols = [ann.masklet_keys.index(k) for k in keys]
        with np.load(os.path.join(folder, "masks.npz")) as z:
            masks, fi, mfi = z["masks"], z["frame_indices"], z["mask_frame_indices"]
        np.testing.assert_array_equal(fi, np.arange(RULE.frames) * 4)  # 6 of 24 fps from frame 0
        np.testing.assert_array_equal(mfi, fi)
        for t, f in enumerate(mfi):
            dec = mask_utils.decode([ann.rles[f // ann.stride][c] for c in cols]).astype(bool)
            ids = clips.resize_ids(tj.ids_from_masks(dec)[None], box, hw)[0]
            np.testing.assert_array_equal(masks[t], tj.masks_from_ids(ids, len(cols)))
        with np.load(os.path.join(folder, "first_frame_masks.npz")) as z:
            np.testing.assert_array_equal(z["masks"], masks[0])
        for k, rel in enumerate(e["files"]["masks"]):
            np.testing.assert_array_equal(np.asarray(Image.open(os.path.join(folder, rel))) > 0, masks[0, ..., k])
        assert masks[0].any((0, 1)).all()
        cap = entries[e["video_id"]]
        assert e["caption"] == cap.caption and e["motion_prompt"] == cap.motion_prompt
        assert e["local_prompts"] == [cap.local_prompts[k] for k in keys]
        assert e["prompt_sources"]["local_prompts"] == ["sidecar"] * len(keys)


def test_requests_validate_with_the_reader(built):
    _, _, out, summary = built
    reqs = requests_lib.read_requests(os.path.join(out, sav128.REQUESTS))
    assert [r.name for r in reqs] == [e["video_id"] for e in summary.manifest["videos"]]
    for r, e in zip(reqs, summary.manifest["videos"], strict=True):
        inputs = requests_lib.load_inputs(r, RULE.height, RULE.width, RULE.max_objects)
        with np.load(os.path.join(out, "videos", e["video_id"], "first_frame_masks.npz")) as z:
            np.testing.assert_array_equal(inputs.masks, z["masks"])
        assert inputs.crop is None and r.local_prompts == e["local_prompts"] and r.caption == e["caption"]
        assert r.motion_prompt == e["motion_prompt"]


def _mtimes(folder):
    return {os.path.join(p, f): os.stat(os.path.join(p, f)).st_mtime_ns for p, _, fs in os.walk(folder) for f in fs}


def test_rerun_is_a_noop_and_another_selection_is_refused(built, tmp_path):
    d, caps, out, _ = built
    copy = str(tmp_path / "bench")
    shutil.copytree(out, copy)
    before = _mtimes(copy)
    again = sav128.build(d, caps, copy, num_single=NUM, num_multi=NUM, rule=RULE)
    assert again.already and again.built == 0 and _mtimes(copy) == before
    with pytest.raises(ValueError, match=r"num_single.*--overwrite"):
        sav128.build(d, caps, copy, num_single=NUM - 1, num_multi=NUM, rule=RULE)
    assert _mtimes(copy) == before
    fewer = sav128.build(d, caps, copy, num_single=NUM - 1, num_multi=NUM, rule=RULE, overwrite=True)
    ids = [e["video_id"] for e in fewer.manifest["videos"]]
    assert fewer.built == 0 and len(ids) == 2 * NUM - 1  # the kept videos are reused, not rewritten
    assert sorted(os.listdir(os.path.join(copy, "videos"))) == sorted(ids)


def test_interrupted_build_resumes(built, tmp_path):
    d, caps, out, summary = built
    copy = str(tmp_path / "bench")
    shutil.copytree(out, copy)
    os.remove(os.path.join(copy, sav128.MANIFEST))
    victim = summary.manifest["videos"][1]["video_id"]
    os.remove(os.path.join(copy, "videos", victim, sav128.VIDEO_FILE))
    resumed = sav128.build(d, caps, copy, num_single=NUM, num_multi=NUM, rule=RULE)
    assert resumed.built == 1 and resumed.manifest["videos"] == summary.manifest["videos"]


def test_ids_reuse_a_given_list_and_name_missing_ones(synth, built, tmp_path):
    d, caps, _, summary = built
    multi = next(e["video_id"] for e in summary.manifest["videos"] if e["split"] == "multi")
    single = next(e["video_id"] for e in summary.manifest["videos"] if e["split"] == "single")
    # a multi-object video listed as single: its largest moving object
    ids = tmp_path / "ids.txt"
    ids.write_text(f"# published\n{single}\n{multi},single\n\nsav_000024,multi\n")
    out = str(tmp_path / "ids_bench")
    got = sav128.build(d, caps, out, ids=str(ids), rule=RULE)
    vids = [(e["video_id"], e["split"], len(e["objects"])) for e in got.manifest["videos"]]
    assert [v[:2] for v in vids] == [(single, "single"), (multi, "single"), ("sav_000024", "multi")]
    assert vids[1][2] == 1 and vids[2][2] >= 2 and got.manifest["rule"]["name"] == "ids"
    assert len(requests_lib.read_requests(os.path.join(out, sav128.REQUESTS))) == 3
    bad = tmp_path / "bad.txt"
    bad.write_text(f"{single}\nsav_999999\n{UNCAPTIONED[0]},single\n")
    with pytest.raises(ValueError, match=rf"not under --sav: sav_999999; without a caption line: {UNCAPTIONED[0]}"):
        sav128.build(d, caps, str(tmp_path / "bad_bench"), ids=str(bad), rule=RULE)
    wrong = tmp_path / "wrong.txt"
    wrong.write_text(f"{single},both\n")
    with pytest.raises(ValueError, match=r"wrong.txt:1: split 'both'"):
        sav128.build(d, caps, str(tmp_path / "wrong_bench"), ids=str(wrong), rule=RULE)


def test_prompts_fall_back_to_the_offline_planner():
    e = captions.CaptionEntry("v", "A red square slides left while a blue disc rises.", "", {"0": "the red square"})
    motion, local, sources = sav128.prompts_for(e, ["0", "1"])
    assert motion == "The red square slides left while the blue disc rises."
    assert local == ["the red square", "the blue disc rises"]
    assert sources == {"motion_prompt": "offline", "local_prompts": ["sidecar", "offline"]}
    e = captions.CaptionEntry("v", "Something happens.", "", {})
    motion, local, sources = sav128.prompts_for(e, ["3"])
    assert motion == local[0] == "Something happens." and sources["local_prompts"] == ["caption"]
    assert sav128.labels_for(["the dog runs", "the dog jumps", "Something happens."]) == ["dog", "dog_2",
                                                                                          "something_happens"]


# ----------------------------------------------------------------------------------------------- the real sample

REAL_RULE = select.Rule(height=64, width=64, frames=9, fps=6.0)  # 33 source frames


@needs_sample("sav_000001_manual.json")
def test_real_sample(tmp_path):
    """The real annotation (848x480 H x W, 5 manual masklets) with an mp4 of its clip's frames drawn from its masks."""
    manual = os.path.join(SAV_SAMPLE, "sav_000001_manual.json")
    ann = sav.read_annotation(sav.VideoRef("sav_000001", sav.Source(""), (("manual", sav.Source(manual)),)))
    a = select.analyse(ann, REAL_RULE)
    by_key = {m.key: m for m in a.masklets}
    # masklets 0 and 3 are not in the first frame; 2 moves but is small; 4 moves inside 1 (a part of it)
    assert not by_key["0"].moving and not by_key["3"].moving and by_key["2"].moving and not by_key["2"].large
    m0 = ann.masks([0])[0]
    assert (m0[..., 4] <= m0[..., 1]).all() and by_key["4"].moving and by_key["4"].large
    assert a.split == "single" and [ann.masklet_keys[k] for k in a.objects] == ["1"]
    d = tmp_path / "sav"
    d.mkdir()
    shutil.copy(manual, d / "sav_000001_manual.json")
    n = a.frame_indices[-1] + 1
    pos = np.clip(np.floor(np.arange(n) / ann.stride + 0.5), 0, ann.num_annotated - 1).astype(int)
    frames = np.stack([tj.render_ids(tj.ids_from_masks(ann.masks([p])[0])) for p in pos])
    (d / "sav_000001.mp4").write_bytes(video_io.encode_video(frames, 24.0, crf=18))
    caps = tmp_path / "captions.jsonl"
    captions.write_captions(caps, [captions.CaptionEntry("sav_000001", "A person walks to the left.", "", {})])
    out = str(tmp_path / "bench")
    got = sav128.build(str(d), str(caps), out, num_single=64, num_multi=64, rule=REAL_RULE)
    (e,) = got.manifest["videos"]
    assert e["split"] == "single" and e["num_moving"] == 2 and got.manifest["selected"] == {"single": 1, "multi": 0}
    assert e["motion_prompt"] == "The person walks to the left." and e["prompt_sources"]["motion_prompt"] == "offline"
    hw = (REAL_RULE.height, REAL_RULE.width)
    (ref,) = sav.find_videos(str(d))
    first = np.asarray(Image.open(os.path.join(out, "videos", "sav_000001", "first_frame.png")))
    np.testing.assert_array_equal(first, clips.resize_frames(sav.read_frames(ref, [0]), a.box, hw)[0])
    with np.load(os.path.join(out, "videos", "sav_000001", "masks.npz")) as z:
        masks = z["masks"]
    for t, f in enumerate(e["mask_frame_indices"]):
        dec = mask_utils.decode([ann.rles[f // ann.stride][1]]).astype(np.uint8)[..., 0]
        np.testing.assert_array_equal(masks[t, ..., 0], clips.resize_ids(dec[None], a.box, hw)[0] > 0)
    (req,) = requests_lib.read_requests(os.path.join(out, sav128.REQUESTS))
    assert requests_lib.load_inputs(req, *hw, 4).masks.shape == (*hw, 1)


def test_val_test_layout(tmp_path):
    """SA-V val/test folders (JPEG frames at 24 fps, one PNG folder per object at 6 fps) are read as the shards are."""
    root = tmp_path / "sav_val"
    vids = [synthetic.make_video(0, i, height=64, width=64, frames=33) for i in (4, 5)]  # 1 still + 1 moving; 3 moving
    for v in vids:
        (root / "JPEGImages_24fps" / v.video_id).mkdir(parents=True)
        for f, frame in enumerate(v.frames):
            Image.fromarray(frame).save(root / "JPEGImages_24fps" / v.video_id / f"{f:05d}.jpg", quality=95)
        for k in range(v.masks.shape[-1]):
            obj = root / "Annotations_6fps" / v.video_id / f"{k:03d}"
            obj.mkdir(parents=True)
            for f in range(0, v.frames.shape[0], 4):
                Image.fromarray(np.where(v.masks[f, ..., k], 255, 0).astype(np.uint8)).save(obj / f"{f:05d}.png")
    caps = tmp_path / "captions.jsonl"
    captions.write_captions(caps, [captions.CaptionEntry(**v.caption_entry) for v in vids])
    got = sav128.build(str(root), str(caps), str(tmp_path / "bench"), num_single=2, num_multi=2, rule=RULE)
    assert [(e["video_id"], e["split"], [o["masklet_key"] for o in e["objects"]]) for e in got.manifest["videos"]] == [
        ("sav_000005", "single", ["001"]), ("sav_000006", "multi", ["000", "001", "002"])]  # keys: folder names
    assert len(requests_lib.read_requests(str(tmp_path / "bench" / sav128.REQUESTS))) == len(got.manifest["videos"])
