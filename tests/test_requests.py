"""Generation requests under bad input, without any model: every check names the request, the file or field and the
fix; an image of another aspect ratio is centre-cropped as training crops clips (masks too); a requests JSONL is not
all-or-nothing, and every request is checked before a stage is loaded.

The stage workdirs here hold only the config a training run saves when it starts (`config.json`, an empty
`checkpoints/`): loading a stage from them fails, so a sample run that reaches the models would raise.
"""

import importlib.util
import json
import pathlib

import numpy as np
import pytest
from PIL import Image

from ttm_jax import config as config_lib
from ttm_jax.data import clips
from ttm_jax.inference import requests as requests_lib
from ttm_jax.inference import run

ROOT = pathlib.Path(__file__).resolve().parent.parent
_TINY = config_lib.build(2, "tiny").data
SIZE, MAX_OBJECTS = int(_TINY.height), int(_TINY.max_objects)
assert _TINY.height == _TINY.width


def _png(path: pathlib.Path, array: np.ndarray) -> str:
    Image.fromarray(array).save(path)
    return str(path)


def _square(h: int, w: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    m = np.zeros((h, w), np.uint8)
    m[y0:y1, x0:x1] = 255
    return m


@pytest.fixture
def scene(tmp_path):
    """A random SIZE x SIZE first frame and two square object masks at its size."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    return {"image": _png(tmp_path / "frame.png", image), "array": image,
            "masks": [_png(tmp_path / "red_square.png", _square(SIZE, SIZE, 2, 10, 2, 10)),
                      _png(tmp_path / "blue_square.png", _square(SIZE, SIZE, 16, 28, 16, 28))],
            "dir": tmp_path}


@pytest.fixture
def workdirs(tmp_path):
    """Stage workdirs holding only the saved tiny configs (no checkpoint: no model can be loaded from them)."""
    out = []
    for stage in (1, 2):
        d = tmp_path / f"stage{stage}"
        (d / "checkpoints").mkdir(parents=True)
        (d / "config.json").write_text(config_lib.build(stage, "tiny").to_json(indent=2))
        out.append(str(d))
    return out


def sample_config(s1: str, s2: str, **sample):
    spec = importlib.util.spec_from_file_location("sample_config", ROOT / "configs" / "sample.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.sample.stage1_workdir, config.sample.stage2_workdir = s1, s2
    for k, v in sample.items():
        config.sample[k] = v
    return config


CAPTION = "the red square slides left while the blue square rises"


# ------------------------------------------------------------------------------------------------- single checks


def test_mask_png_of_another_size_names_the_file(scene):
    """A mask PNG of another size than the image and the other masks: the error names that file, both sizes and the
    fix (not numpy's `all input arrays must have the same shape`)."""
    small = _png(scene["dir"] / "small.png", _square(SIZE // 2, SIZE, 0, 8, 0, 8))
    req = requests_lib.Request(image=scene["image"], caption=CAPTION, masks=[*scene["masks"], small], name="v")
    with pytest.raises(ValueError, match=rf"request 'v' `masks`: mask '.*small.png' is {SIZE}x"
                                         rf"{SIZE // 2} \(WxH\) but the image is {SIZE}x{SIZE} \(as are "
                                         rf"red_square.png, blue_square.png\); .*resize small.png to {SIZE}x{SIZE}"):
        requests_lib.load_masks(req, (SIZE, SIZE), SIZE, SIZE)


def test_image_that_is_not_an_image_names_the_file(scene):
    bad = scene["dir"] / "notes.png"
    bad.write_text("this is not a PNG")
    with pytest.raises(ValueError, match=r"config.sample.image: '.*notes.png' is not an image PIL can read .*give the "
                                         r"first frame as a PNG or JPEG"):
        requests_lib.load_image(str(bad), SIZE, SIZE)
    req = requests_lib.Request(image=str(bad), caption=CAPTION, masks=scene["masks"], name="n", source="r.jsonl:2")
    with pytest.raises(requests_lib.RequestError, match=r"request 'n' \(r.jsonl:2\) `image`: '.*notes.png' is not an "
                                                        r"image"):
        requests_lib.load_inputs(req, SIZE, SIZE, MAX_OBJECTS)
    mask = scene["dir"] / "mask.png"
    mask.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    req = requests_lib.Request(image=scene["image"], caption=CAPTION, masks=[str(mask)], name="m")
    with pytest.raises(requests_lib.RequestError, match=r"request 'm' `masks`: mask '.*mask.png' is not an image"):
        requests_lib.load_inputs(req, SIZE, SIZE, MAX_OBJECTS)


def test_more_objects_than_max_objects_names_the_field(scene):
    n = MAX_OBJECTS + 1
    masks = [_png(scene["dir"] / f"obj{k}.png", _square(SIZE, SIZE, 0, 4, 4 * k, 4 * k + 4)) for k in range(n)]
    req = requests_lib.Request(image=scene["image"], caption=CAPTION, masks=masks, name="many", source="r.jsonl:7")
    with pytest.raises(requests_lib.RequestError,
                       match=rf"request 'many' \(r.jsonl:7\) `masks`: {n} objects \(png .*\), but the stage models "
                             rf"take at most data.max_objects={MAX_OBJECTS}; give at most {MAX_OBJECTS} masks"):
        requests_lib.load_inputs(req, SIZE, SIZE, MAX_OBJECTS)


def test_other_aspect_ratio_is_centre_cropped_like_training(tmp_path):
    """A 2:1 image for 1:1 models: the centre crop (as `clips` crops training clips), not a squash; the masks get the
    same crop; the crop is reported."""
    rng = np.random.default_rng(1)
    wide = rng.integers(0, 256, (SIZE, 2 * SIZE, 3), dtype=np.uint8)  # [H, 2H, 3]
    path = _png(tmp_path / "wide.png", wide)
    image, size = requests_lib.load_image(path, SIZE, SIZE)
    assert size == (SIZE, 2 * SIZE)
    np.testing.assert_array_equal(image, wide[:, SIZE // 2:SIZE // 2 + SIZE])  # scale 1: the crop itself
    big = rng.integers(0, 256, (2 * SIZE, 4 * SIZE, 3), dtype=np.uint8)  # also 2:1, scale 2
    image, _ = requests_lib.load_image(_png(tmp_path / "big.png", big), SIZE, SIZE)
    box = clips.crop_box(2 * SIZE, 4 * SIZE, SIZE, SIZE, mode="center")
    np.testing.assert_array_equal(image, clips.resize_frames(big[None], box, (SIZE, SIZE))[0])

    inside = _square(SIZE, 2 * SIZE, 4, 12, SIZE // 2 + 2, SIZE // 2 + 10)  # in the centre half
    straddling = _square(SIZE, 2 * SIZE, 20, 30, SIZE - 4, SIZE + 40)
    masks = [_png(tmp_path / "a.png", inside), _png(tmp_path / "b.png", straddling)]
    req = requests_lib.Request(image=path, caption=CAPTION, masks=masks)
    got, _, _ = requests_lib.load_masks(req, size, SIZE, SIZE)
    want = np.stack([inside, straddling], -1)[:, SIZE // 2:SIZE // 2 + SIZE] > 0
    np.testing.assert_array_equal(got, want)

    inputs = requests_lib.load_inputs(req, SIZE, SIZE, MAX_OBJECTS)
    assert inputs.crop == (SIZE / 2, 0.0, SIZE * 1.5, float(SIZE))
    assert "centre-cropped" in inputs.crop_note and "2:1" in inputs.crop_note and "data.crop=center" in inputs.crop_note
    assert inputs.crop_json()["box"] == [SIZE / 2, 0.0, SIZE * 1.5, SIZE]
    same = requests_lib.load_inputs(requests_lib.Request(image=wide[:, :SIZE], caption=CAPTION, masks=np.stack(
        [inside[:, :SIZE], inside[:, :SIZE]], -1) > 0), SIZE, SIZE, MAX_OBJECTS)
    assert same.crop is None and same.crop_note == "" and same.crop_json() is None

    outside = _png(tmp_path / "left_edge.png", _square(SIZE, 2 * SIZE, 0, 8, 0, 8))  # in the cropped-off margin
    req = requests_lib.Request(image=path, caption=CAPTION, masks=[masks[0], outside], name="edge")
    with pytest.raises(requests_lib.RequestError, match=r"request 'edge' `masks`: object\(s\) 2 \(left edge\) lie "
                                                        r"outside the centre crop"):
        requests_lib.load_inputs(req, SIZE, SIZE, MAX_OBJECTS)


def test_read_request_lines_keeps_going(tmp_path, scene):
    path = tmp_path / "r.jsonl"
    path.write_text("# header\n"
                    '{"image": "frame.png", "caption": "x", "name": "a"\n'  # line 2: cut short
                    f'{json.dumps({"image": scene["image"], "caption": CAPTION, "name": "b"})}\n'
                    '["not", "an", "object"]\n'
                    '{"image": "frame.png", "caption": "x", "name": "b"}\n'
                    '{"caption": "no image"}\n')
    lines = requests_lib.read_request_lines(str(path))
    assert [(x.line, x.name) for x in lines] == [(2, "r_0002"), (3, "b"), (4, "r_0004"), (5, "b"), (6, "r_0006")]
    assert [x.request is not None for x in lines] == [False, True, False, False, False]
    assert lines[0].error.startswith(f"{path}:2: not JSON")
    assert "not a JSON object" in lines[2].error
    assert "name 'b' is already used by line 3" in lines[3].error
    assert lines[4].error == f"{path}:6: `image` is required"
    assert lines[1].request.source == f"{path}:3"


# ------------------------------------------------------------------------ the sample job: checks before any model


def test_bad_jsonl_lines_are_each_reported_and_skipped_before_any_model(workdirs, scene, tmp_path, capsys):
    """Every line is bad in its own way: each is reported on one line naming its line number and the reason, the job
    writes `samples.jsonl` with a `skipped: <reason>` status per line, and never loads a stage (these workdirs have
    no checkpoint, so loading one would raise)."""
    d = scene["dir"]
    notes = d / "notes.png"
    notes.write_text("not an image")
    small = _png(d / "small.png", _square(SIZE // 2, SIZE, 0, 8, 0, 8))
    many = [_png(d / f"obj{k}.png", _square(SIZE, SIZE, 0, 4, 4 * k, 4 * k + 4)) for k in range(MAX_OBJECTS + 1)]
    good = {"image": scene["image"], "caption": CAPTION, "masks": scene["masks"]}
    lines = ['{"image": "frame.png", "caption": oops}',  # 1: malformed
             json.dumps({**good, "image": str(d / "missing.png"), "name": "missing"}),  # 2
             json.dumps({**good, "image": str(notes), "name": "notes"}),  # 3
             json.dumps({**good, "masks": [*scene["masks"], small], "name": "sizes"}),  # 4
             json.dumps({**good, "masks": many, "name": "many"}),  # 5
             json.dumps({**good, "caption": "a quiet afternoon", "name": "unplannable"}),  # 6: no motion verb
             json.dumps({**good, "colour": "red", "name": "unknown"})]  # 7
    jsonl = d / "r.jsonl"
    jsonl.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    records = run.sample(sample_config(*workdirs, requests=str(jsonl)), str(out))

    reasons = ["not JSON", "missing.png' does not exist", "notes.png' is not an image PIL can read",
               f"small.png' is {SIZE}x{SIZE // 2} (WxH) but the image is {SIZE}x{SIZE}",
               f"{MAX_OBJECTS + 1} objects", "no motion verb", "unknown key(s) ['colour']"]
    assert [r["name"] for r in records] == ["r_0001", "missing", "notes", "sizes", "many", "unplannable", "unknown"]
    for r, why in zip(records, reasons, strict=True):
        assert r["status"].startswith("skipped: ") and why in r["status"], (r, why)
        assert r["video"] is None
    assert f"data.max_objects={MAX_OBJECTS}" in records[4]["status"] and "`masks`" in records[4]["status"]
    assert "`caption`" in records[5]["status"]
    saved = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert [(r["name"], r["status"]) for r in saved] == [(r["name"], r["status"]) for r in records]

    err = capsys.readouterr().err.splitlines()
    for n, why in enumerate(reasons, 1):
        said = [x for x in err if x.startswith("skipped") and f"r.jsonl:{n}" in x]
        assert len(said) == 1 and why in said[0], (n, err)


def test_single_request_error_names_the_config_field_before_any_model(workdirs, scene, tmp_path):
    small = _png(scene["dir"] / "small.png", _square(SIZE // 2, SIZE, 0, 8, 0, 8))
    config = sample_config(*workdirs, image=scene["image"], caption=CAPTION,
                           masks=",".join([*scene["masks"], small]))
    with pytest.raises(config_lib.ConfigError, match=r"^config.sample.masks: mask '.*small.png' is"):
        run.sample(config, str(tmp_path / "out"))
    config = sample_config(*workdirs, image=scene["image"], caption=CAPTION,
                           masks=",".join(scene["masks"][:1] * (MAX_OBJECTS + 1)))
    with pytest.raises(config_lib.ConfigError, match=rf"^config.sample.masks: {MAX_OBJECTS + 1} objects .*configs "
                                                     rf"saved in .*stage1 .* data.max_objects={MAX_OBJECTS};"):
        run.sample(config, str(tmp_path / "out"))


def test_the_sample_job_segments_boxes_as_configured(workdirs, scene, tmp_path):
    """`run.sample` hands `config.sample`'s segmenter to every request: asked for SAM2 masks of boxes without SAM2
    weights, the request fails naming `config.sample.sam2_path`, before any model; with `box_masks=rectangles` the
    boxes are read as before (this request then fails only for lack of checkpoints, later)."""
    config = sample_config(*workdirs, image=scene["image"], caption=CAPTION, boxes="0,0,8,8", box_masks="sam2")
    with pytest.raises(config_lib.ConfigError, match=r"config\.sample\.sam2_path"):
        run.sample(config, str(tmp_path / "out"))
    config = sample_config(*workdirs, image=scene["image"], caption=CAPTION, boxes="0,0,8,8", box_masks="rectangles")
    with pytest.raises(Exception) as e:
        run.sample(config, str(tmp_path / "out2"))
    assert "sam2_path" not in str(e.value)
