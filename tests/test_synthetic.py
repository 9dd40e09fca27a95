"""Synthetic SA-V: the real file format, truthful captions, determinism by seed."""

import io
import json
import os
import re
import subprocess
import sys
import tarfile

import av
import numpy as np
import pytest
from pycocotools import mask as mask_utils
from sample_data import SAV_SAMPLE, needs_sample

from ttm_jax.data import captions as captions_lib
from ttm_jax.data import sav, synthetic

REAL_JSON = os.path.join(SAV_SAMPLE, "sav_000001_manual.json")
real_sample = needs_sample("sav_000001_manual.json")
H, W, F, N = 64, 64, 24, 12


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("syn"))
    synthetic.generate(out, N, seed=7, split="mixed", height=H, width=W, frames=F, videos_per_shard=5)
    return out


def _members(folder):
    out = {}
    for shard in sorted(f for f in os.listdir(folder) if f.endswith(".tar")):
        with tarfile.open(os.path.join(folder, shard)) as tar:
            for m in tar.getmembers():
                out[m.name] = tar.extractfile(m).read()
    return out


def _type_signature(value):
    """A json value's type tree, lists summarised by the set of their element signatures."""
    if isinstance(value, list):
        return ("list", tuple(sorted({repr(_type_signature(v)) for v in value})))
    if isinstance(value, dict):
        return ("dict", tuple(sorted((k, repr(_type_signature(v))) for k, v in value.items())))
    return type(value).__name__


def test_layout_and_reader(folder):
    members = _members(folder)
    # released layout: sav_XXX/sav_XXXXXX.mp4 + _manual.json, shards of videos_per_shard videos
    assert sorted(f for f in os.listdir(folder) if f.endswith(".tar")) == ["sav_000.tar", "sav_001.tar", "sav_002.tar"]
    assert "sav_001/sav_000006.mp4" in members and "sav_001/sav_000006_manual.json" in members
    assert len(members) == 2 * N
    refs = sav.find_videos(folder)
    assert [r.video_id for r in refs] == [synthetic.video_id(i) for i in range(N)]
    frames = sav.read_frames(refs[0], list(range(F)))
    assert frames.shape == (F, H, W, 3) and frames.dtype == np.uint8
    ann = sav.read_annotation(refs[0])
    assert ann.stride == 4 and ann.num_annotated == (F - 1) // 4 + 1 and (ann.height, ann.width) == (H, W)
    caps = captions_lib.load_captions(os.path.join(folder, synthetic.CAPTIONS_FILE))
    assert sorted(caps) == [r.video_id for r in refs]
    for r in refs:
        assert sorted(caps[r.video_id].local_prompts) == sav.read_annotation(r).masklet_keys


@real_sample
def test_json_has_every_field_with_the_real_types(folder):
    with open(REAL_JSON) as f:
        real = json.load(f)
    members = _members(folder)
    for name, data in members.items():
        if not name.endswith("_manual.json"):
            continue
        d = json.loads(data)
        assert list(d) == list(real), name  # same fields, same order
        for key in real:
            if key == "masklet":
                continue
            assert _type_signature(d[key]) == _type_signature(real[key]), (name, key)
        # masklet: [annotated frame][object] {"size": [H, W] ints, "counts": str}
        assert _type_signature(d["masklet"][0][0]) == _type_signature(real["masklet"][0][0])
        k = d["masklet_num"]
        assert d["masklet_id"] == list(range(k)) and all(len(row) == k for row in d["masklet"])
        assert len(d["masklet"]) == (int(d["video_frame_count"]) - 1) // 4 + 1
        assert d["video_duration"] == d["video_frame_count"] / 24
        assert d["video_resolution"] == d["video_height"] * d["video_width"]
        # semantics as the real file: mean area over visible annotated frames, relative size, buckets, first frame
        areas = np.array([[mask_utils.area(rle) for rle in row] for row in d["masklet"]], float)
        for j in range(k):
            vis = areas[:, j] > 0
            assert d["masklet_size_abs"][j] == pytest.approx(areas[vis, j].mean(), rel=1e-9)
            assert d["masklet_size_rel"][j] == pytest.approx(areas[vis, j].mean() / (H * W), rel=1e-8)
            assert d["masklet_first_appeared_frame"][j] == float(np.argmax(vis))
            f0 = int(np.argmax(vis))
            assert d["masklet_visibility_changes"][j] == int(np.sum(vis[f0 + 1:] != vis[f0:-1]))
            assert d["masklet_size_bucket"][j] == ("small" if areas[vis, j].mean() < 1024 else "medium")
            assert d["masklet_frame_count"][j] == len(d["masklet"])


@real_sample
def test_the_real_json_semantics_match_ours():
    """The semantics our writer assumes, checked on the real file (not only on ours)."""
    with open(REAL_JSON) as f:
        real = json.load(f)
    areas = np.array([[mask_utils.area(rle) for rle in row] for row in real["masklet"]], float)
    vis = areas > 0
    for j in range(real["masklet_num"]):
        f0 = int(np.argmax(vis[:, j]))
        assert real["masklet_first_appeared_frame"][j] == f0
        assert real["masklet_size_abs"][j] == pytest.approx(areas[vis[:, j], j].mean(), rel=1e-9)
        assert real["masklet_visibility_changes"][j] == int(np.sum(vis[f0 + 1:, j] != vis[f0:-1, j]))


PHRASES = {
    "slides left": (-1, 0), "slides right": (1, 0), "rises": (0, -1), "falls": (0, 1),
    "drifts up and to the left": (-1, -1), "drifts up and to the right": (1, -1),
    "drifts down and to the left": (-1, 1), "drifts down and to the right": (1, 1),
}


def _parse_motion(prompt):
    """'the red square slides left while growing' -> ((-1, 0), 'grow'); parsed from text only."""
    direction = (0, 0)
    for phrase, d in PHRASES.items():
        if re.search(rf"\b{phrase}\b", prompt):
            direction = d
    scale = "grow" if re.search(r"\bgrow", prompt) else ("shrink" if re.search(r"\bshrink", prompt) else "none")
    return direction, scale


def _centroid(mask):
    ys, xs = np.nonzero(mask)
    return np.array([xs.mean(), ys.mean()])


def test_captions_are_truthful(folder):
    """Each local prompt's stated motion is what the object's masks (decoded from the json) do."""
    caps = captions_lib.load_captions(os.path.join(folder, synthetic.CAPTIONS_FILE))
    checked = {"moving": 0, "still": 0, "grow": 0, "shrink": 0}
    for ref in sav.find_videos(folder):
        ann = sav.read_annotation(ref)
        masks = ann.masks()  # [A, H, W, K]
        entry = caps[ref.video_id]
        for m, key in enumerate(ann.masklet_keys):
            prompt = entry.local_prompts[key]
            assert prompt in entry.caption.lower() or prompt.replace("the ", "", 1) in entry.caption.lower()
            direction, scale = _parse_motion(prompt)
            vis = [a for a in range(masks.shape[0]) if masks[a, ..., m].any()]
            first, last = masks[vis[0], ..., m], masks[vis[-1], ..., m]
            move = _centroid(last) - _centroid(first)
            for axis in range(2):
                if direction[axis]:
                    assert np.sign(move[axis]) == direction[axis] and abs(move[axis]) > 0.1 * W, (prompt, move)
                else:
                    assert abs(move[axis]) < 0.1 * W, (prompt, move)
            ratio = last.sum() / first.sum()
            # visible area: x2.56 growing, x0.36 shrinking, and occlusion hides at most 30% on either end
            if scale == "grow":
                assert ratio > 1.5, (prompt, ratio)
            elif scale == "shrink":
                assert ratio < 0.7, (prompt, ratio)
            else:
                assert 0.7 <= ratio <= 1 / 0.7, (prompt, ratio)
            checked["moving" if any(direction) else "still"] += 1
            if scale != "none":
                checked[scale] += 1
        # the motion prompt names every object's motion
        for key in ann.masklet_keys:
            words = entry.local_prompts[key].split()
            at = next(i for i, w in enumerate(words) if w in synthetic.SHAPES)
            assert " ".join([words[1], *words[at:]]) in entry.motion_prompt.lower()
    assert checked["moving"] >= 5 and checked["still"] + checked["grow"] + checked["shrink"] >= 2, checked


def test_named_colours_are_in_the_video(folder):
    """The colour a caption names is the colour the decoded mp4 shows inside that object's mask."""
    caps = captions_lib.load_captions(os.path.join(folder, synthetic.CAPTIONS_FILE))
    palette = np.array(list(synthetic.OBJECT_COLOURS.values()), float)
    names = list(synthetic.OBJECT_COLOURS)
    for ref in sav.find_videos(folder)[:6]:
        ann = sav.read_annotation(ref)
        frames = sav.read_frames(ref, ann.annotated_frames).astype(float)
        masks = ann.masks()
        for m, key in enumerate(ann.masklet_keys):
            colour = caps[ref.video_id].local_prompts[key].split()[1]
            pixels = frames[masks[..., m]]
            brightest = pixels[pixels.sum(-1) >= np.quantile(pixels.sum(-1), 0.6)].mean(0)  # texture darkens
            nearest = names[int(np.argmin(((palette - brightest) ** 2).sum(-1)))]
            assert nearest == colour, (ref.video_id, colour, brightest)


def test_deterministic_by_seed(folder, tmp_path):
    again = str(tmp_path / "again")
    synthetic.generate(again, N, seed=7, split="mixed", height=H, width=W, frames=F, videos_per_shard=5)
    for fn in sorted(os.listdir(folder)):
        with open(os.path.join(folder, fn), "rb") as a, open(os.path.join(again, fn), "rb") as b:
            assert a.read() == b.read(), fn  # bit-identical tars (mp4 + json) and captions
    refs_a, refs_b = sav.find_videos(folder), sav.find_videos(again)
    np.testing.assert_array_equal(sav.read_frames(refs_a[3], range(F)), sav.read_frames(refs_b[3], range(F)))
    other = str(tmp_path / "other")
    synthetic.generate(other, 2, seed=8, split="mixed", height=H, width=W, frames=F, videos_per_shard=5)
    assert _members(other)["sav_000/sav_000001_manual.json"] != _members(folder)["sav_000/sav_000001_manual.json"]


@pytest.mark.parametrize("split,counts", [("single", {1}), ("multi", {2, 3, 4})])
def test_split_controls_object_count(split, counts):
    ks = {len(synthetic.sample_scene(0, i, split=split, height=H, width=W, frames=F).objects) for i in range(20)}
    assert ks <= counts and (len(ks) >= 2 or len(counts) == 1)
    cats = {synthetic.caption_entry("x", synthetic.sample_scene(0, i, split=split)).get("category") for i in range(5)}
    assert cats == {split}


def test_cli(tmp_path):
    out = tmp_path / "cli"
    r = subprocess.run([sys.executable, "-m", "ttm_jax.data.synthetic", f"--out={out}", "--num_videos=2", "--seed=3",
                        "--height=32", "--width=48", "--frames=9", "--split=single", "--with_auto"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    members = _members(str(out))
    auto = json.loads(members["sav_000/sav_000002_auto.json"])
    assert auto["masklet_type"] == ["auto"] and len(auto["masklet_stability_score"][0]) == 3
    with av_open(members["sav_000/sav_000002.mp4"]) as c:
        s = c.streams.video[0]
        assert (s.codec_context.name, int(s.average_rate), s.height, s.width, s.frames) == ("h264", 24, 32, 48, 9)


def av_open(data):
    return av.open(io.BytesIO(data))


# ------------------------------------------------------------------------------------------------ the ladder


@pytest.mark.parametrize("rung", [1, 2, 3])
def test_ladder_rungs_hold_what_they_promise(rung):
    """Each rung below the full set: its object count, plain objects on a plain background, translation only (never
    still, no scale change or spin), distinct colours and directions, a speed the prompt names on rung 1 and a random
    one after; the rendered masks move the way the prompt says, by the displacement the speed implies."""
    counts, speeds = set(), set()
    for i in range(12):
        v = synthetic.make_video(3, i, height=H, width=W, frames=F, rung=rung)
        objs = v.scene.objects
        counts.add(len(objs))
        assert v.scene.background_texture == "plain" and len(np.unique(v.frames[0].reshape(-1, 3), axis=0)) <= 1 + \
            len(objs)  # one background colour, one colour per (plain) object
        assert len({o.colour for o in objs}) == len(objs) and len({o.direction for o in objs}) == len(objs)
        for k, o in enumerate(objs):
            assert (o.texture, o.scale_change, o.spin) == ("plain", "none", 0.0) and o.direction != "still"
            fraction = abs(o.displacement[0] or o.displacement[1]) / (W - 2 * synthetic._bounding_radius(o.radius,
                                                                                                      "none"))
            if rung == 1:
                assert o.speed in synthetic.SPEEDS and fraction == pytest.approx(synthetic.SPEEDS[o.speed])
                assert o.local_prompt().endswith(f"{synthetic.DIRECTIONS[o.direction][1]} {o.speed}")
            else:
                assert o.speed == "" and synthetic.TRAVEL_FRACTION[0] <= fraction <= synthetic.TRAVEL_FRACTION[1]
            speeds.add(o.speed)
            assert o.local_prompt() in v.caption_entry["local_prompts"].values()
            # whole silhouettes (occlusion would move a visible-mask centroid), first and last frame
            move = _centroid(synthetic._full_masks(v.scene, F - 1)[..., k]) - _centroid(
                synthetic._full_masks(v.scene, 0)[..., k])  # (x, y)
            ux, uy = synthetic.DIRECTIONS[o.direction][0]
            np.testing.assert_allclose(move, o.displacement, atol=1.5)
            assert np.sign(move[0]) == ux or abs(move[0]) < 1 and not ux
            assert np.sign(move[1]) == uy or abs(move[1]) < 1 and not uy
    assert counts == ({1} if rung < 3 else {2, 3})
    assert speeds == ({"slowly", "quickly"} if rung == 1 else {""})


def test_ladder_params_and_config_agree():
    """The config's rung list is the generator's; a folder's parameters name the rung only below the full set (a
    full-set folder written before the ladder still matches); bad rungs fail with the field's name."""
    from ttm_jax import config as config_lib
    assert config_lib.SYNTHETIC_RUNGS == tuple(sorted(synthetic.RUNGS))
    assert config_lib.SYNTHETIC_FULL_RUNG == synthetic.FULL_RUNG == max(synthetic.RUNGS)
    p = dict(num_videos=2, seed=0, split="mixed", height=H, width=W, frames=F, videos_per_shard=2, with_auto=False)
    assert "rung" not in synthetic.params(**p) and synthetic.params(**p, rung=2)["rung"] == 2
    c = config_lib.build(1, "tiny")
    c.data.synthetic_rung = 5
    with pytest.raises(config_lib.ConfigError, match="config.data.synthetic_rung"):
        config_lib.validate(c)
    with pytest.raises(ValueError, match="--rung"):
        synthetic.sample_scene(0, 0, rung=0)


def test_ladder_folder_is_deterministic_and_readable(tmp_path):
    """A rung-3 folder through the real SA-V reader: the right counts, captions naming each object's own direction,
    bit-identical on a second write."""
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    for out in (a, b):
        synthetic.generate(out, 3, seed=1, height=H, width=W, frames=F, videos_per_shard=2, rung=3)
    assert _members(a) == _members(b)
    with open(os.path.join(a, synthetic.DONE_FILE)) as f:
        assert json.load(f)["rung"] == 3
    caps = captions_lib.load_captions(os.path.join(a, synthetic.CAPTIONS_FILE))
    for ref in sav.find_videos(a):
        ann = sav.read_annotation(ref)
        assert 2 <= ann.num_masklets <= 3
        prompts = caps[ref.video_id].local_prompts
        assert len({_parse_motion(prompts[k])[0] for k in ann.masklet_keys}) == ann.num_masklets
