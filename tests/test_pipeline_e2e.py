"""Two-stage generation end to end, from tiny checkpoints that the real training loop writes in the test.

`tiny_checkpoints()` trains the tiny stage-1 and stage-2 configs for one step each on one device (real DiT, text
encoder, autoencoder, Orbax checkpoints; batches made from real synthetic SA-V videos), cached per source tree in the
temp folder so that the notebook test reuses them.
"""

import contextlib
import fcntl
import functools
import hashlib
import json
import pathlib
import shutil
import tempfile
import time

import flax.linen as nn
import jax
import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from ttm_jax import config as config_lib
from ttm_jax.backbones.wan import model as dit
from ttm_jax.data import synthetic, trajectory, video_io
from ttm_jax.inference import requests as requests_lib
from ttm_jax.inference import run
from ttm_jax.models import conditioning, ttm_layers
from ttm_jax.models import tokenizer as tokenizer_lib
from ttm_jax.train import loop

ROOT = pathlib.Path(__file__).resolve().parent.parent
_TINY = config_lib.build(2, "tiny").data
SIZE, FRAMES = _TINY.height, _TINY.num_frames  # the tiny configs' data.height (= width) and num_frames
assert _TINY.height == _TINY.width


class _FixedBatches:
    """A checkpointable iterator (the Grain iterator protocol the Orbax checkpoint needs) over one fixed batch."""

    def __init__(self, batch):
        self.batch = batch

    def __iter__(self):
        return self

    def __next__(self):
        return self.batch

    def get_state(self):
        return b"{}"

    def set_state(self, state):
        del state


def _batches(config, **_):
    tok = tokenizer_lib.make_tokenizer(config.text_encoder)
    k = int(config.data.max_objects)
    rows = []
    for i in range(int(config.train.batch_size)):
        v = synthetic.make_video(0, i, height=SIZE, width=SIZE, frames=FRAMES)
        m = v.masks[..., :k]
        m = np.concatenate([m, np.zeros(m.shape[:-1] + (k - m.shape[-1],), bool)], -1)
        local = list(v.caption_entry["local_prompts"].values())[:k]
        row = {"video": v.frames, "trajectory": trajectory.render(m), "object_masks": m,
               "num_objects": np.int32(len(local))}
        row.update(requests_lib.tokenize_prompts(config, tok, v.caption_entry["caption"],
                                             v.caption_entry["motion_prompt"], local))
        rows.append(row)
    return _FixedBatches({key: np.stack([r[key] for r in rows]) for key in rows[0]})


def tiny_config(stage):
    c = config_lib.build(stage, "tiny")
    c.train.total_steps, c.train.batch_size, c.train.sample_every_steps = 1, 2, 0
    # two blocks (the tiny stages have 6 and 4): on CPU the blocks are unrolled, so every compile of these stages
    # (training here, sampling in each test) scales with the depth, and these tests check the machinery, not quality
    c.model.num_layers = 2
    # the tiny stages cool down over their second half; one step has none
    c.optim.cooldown_steps, c.optim.cooldown_fraction = 0, 0.0
    c.train.log_every_steps = 1
    c.mesh.shape.fsdp = 1
    c.train.tensorboard = False
    # LLVM -O0 for the training programs (init, step, frozen encoders): they compile about twice as fast (training
    # both stages: 57 s -> 32 s on one core) to the same losses; the sampling programs compile with XLA's defaults
    c.train.compiler_options = {"xla_backend_optimization_level": 0}
    return c


@functools.cache
def tiny_checkpoints() -> tuple[str, str]:
    """Workdirs of a trained tiny stage 1 and stage 2 (one step each), cached by the hash of the package sources
    (computed once per process: a later edit of the sources does not retrain mid-run)."""
    digest = hashlib.sha256()
    for p in sorted((ROOT / "ttm_jax").rglob("*.py")):
        digest.update(p.read_bytes())
    digest.update(pathlib.Path(__file__).read_bytes())
    root = pathlib.Path(tempfile.gettempdir()) / f"ttm_jax_tiny_ckpt_{digest.hexdigest()[:12]}"
    root.mkdir(exist_ok=True)
    for stale in root.parent.glob("ttm_jax_tiny_ckpt_*"):  # caches of older sources, untouched for a day
        if stale != root and time.time() - stale.stat().st_mtime > 86400:
            shutil.rmtree(stale, ignore_errors=True)
    with open(root / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # pytest-xdist workers wait for the one that trains
        for stage in (1, 2):
            done = root / f"stage{stage}.done"
            if not done.exists():
                loop.train(tiny_config(stage), str(root / f"stage{stage}"), make_iterator=_batches,
                           devices=jax.devices()[:1])
                done.write_text("ok")
    return str(root / "stage1"), str(root / "stage2")


# ---------------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A synthetic first frame with two objects, their masks as PNGs named after them, and the true caption."""
    d = tmp_path_factory.mktemp("inputs")
    for index in range(50):
        v = synthetic.make_video(3, index, height=SIZE, width=SIZE, frames=FRAMES)
        if len(v.scene.objects) == 2:
            break
    Image.fromarray(v.frames[0]).save(d / "frame.png")
    masks = []
    for k, obj in reversed(list(enumerate(v.scene.objects))):  # reversed: matching must find the order
        path = d / f"{obj.colour}_{obj.shape}.png"
        Image.fromarray(v.masks[0, ..., k].astype(np.uint8) * 255).save(path)
        masks.append(str(path))
    return {"image": str(d / "frame.png"), "masks": masks, "caption": v.caption_entry["caption"],
            "local": list(v.caption_entry["local_prompts"].values()), "dir": d}


B = 2  # every call uses this batch size, so each stage compiles once


@pytest.fixture(scope="module")
def pipe():
    """The pipeline `run.sample` builds from configs/sample.py (batch 2: a single request is padded)."""
    s1, s2 = tiny_checkpoints()
    return run.build_pipeline(run_config(s1, s2, num_steps=3, batch_size=B))


@pytest.fixture(scope="module")
def generated(pipe, inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    req = requests_lib.Request(image=inputs["image"], caption=inputs["caption"], masks=inputs["masks"], seed=5,
                           name="one")
    return pipe.generate([req], str(out))[0]


# ------------------------------------------------------------------------------------------------------------- tests


def test_writes_mp4s_of_the_configured_size_and_a_json(generated, inputs):
    video = video_io.read_frames(generated["video"])
    assert video.shape == (FRAMES, SIZE, SIZE, 3)
    side = video_io.read_frames(generated["side_by_side"])
    assert side.shape == (FRAMES, SIZE, 3 * SIZE, 3)
    # left panel: the input image held still (H.264 is lossy: compare loosely)
    image = np.asarray(Image.open(inputs["image"]), np.float32)
    assert np.abs(side[:, :, :SIZE].astype(np.float32) - image).mean() < 8
    with open(generated["video"].replace(".mp4", ".json")) as f:
        rec = json.load(f)
    assert rec["planner"] == "offline" and rec["caption"] == inputs["caption"]
    # masks were given in reverse object order, named after the objects: matched by label
    assert rec["local_prompts"] == inputs["local"][::-1]
    assert [o["matched_by"] for o in rec["objects"]] == ["label", "label"]
    assert rec["settings"]["num_steps"] == 3 and rec["stage2"]["step"] == 1


def test_deterministic_per_seed(pipe, inputs):
    """A request's trajectory depends on its own seed only, not on its batch neighbour."""
    item = pipe.prepare(requests_lib.Request(image=inputs["image"], caption=inputs["caption"], masks=inputs["masks"]))
    conds = pipe.s1.conditions(pipe._batch(pipe.s1.stage, [item, item], None))
    a = pipe.s1.decode(pipe.s1.sample(conds, [5, 6], pipe.settings))
    b = pipe.s1.decode(pipe.s1.sample(conds, [7, 5], pipe.settings))
    np.testing.assert_array_equal(a[0], b[1])
    assert np.abs(a[0] - a[1]).max() > 1e-3


def test_trajectory_drives_the_video(pipe, inputs):
    item = pipe.prepare(requests_lib.Request(image=inputs["image"], caption=inputs["caption"], masks=inputs["masks"]))
    still = np.broadcast_to(trajectory.ids_from_masks(item.masks), (FRAMES, SIZE, SIZE)).copy()
    moved = still.copy()
    for f in range(1, FRAMES):  # every object slides right by 3 px per frame
        moved[f] = np.roll(still[0], 3 * f, axis=1)
    videos = pipe.run_stage2([item, item], np.stack([still, moved]))  # same seed (0) for both rows
    again = pipe.run_stage2([item, item], np.stack([moved, still]))
    np.testing.assert_array_equal(videos[0], again[1])
    assert np.abs(videos[0].astype(int) - videos[1].astype(int)).max() > 0


def test_local_prompt_changes_only_its_objects_tokens(pipe, inputs):
    """In the first masked cross-attention layer, changing object 2's local prompt changes object-2 tokens only."""
    stage = pipe.s2.stage
    req = requests_lib.Request(image=inputs["image"], caption=inputs["caption"], masks=inputs["masks"])
    a = pipe.prepare(req)
    b = pipe.prepare(req)
    b.local_prompts = [a.local_prompts[0], "the object spins wildly in place"]
    ids = np.broadcast_to(trajectory.ids_from_masks(a.masks), (B, FRAMES, SIZE, SIZE))
    conds = [jax.tree.map(lambda v: v[:1], pipe.stage2_conditions([x] * B, ids).full) for x in (a, b)]
    cross = np.asarray(conds[0]["cross_token_ids"])[0]
    assert set(np.unique(cross)) >= {1, 2}

    # probe an unscanned copy of the model; the zero-initialised output projection of the masked cross-attention
    # gets random weights so its effect is visible whatever the training step
    c = stage.config.model.copy_and_resolve_references()
    c.scan_layers = False
    model = dit.DiT(c, config_lib.in_channels(stage.config), stage.config.autoencoder.latent_channels)
    params = dit.unscan_layout(jax.device_get(stage.params), ttm_layers=int(c.ttm_layers))
    kernel = params["blocks_0"]["masked_cross_attn"]["attn"]["to_out"]["kernel"]
    params["blocks_0"]["masked_cross_attn"]["attn"]["to_out"]["kernel"] = np.random.default_rng(0).normal(
        size=kernel.shape).astype(np.float32)
    x = np.random.default_rng(1).normal(size=(1, *config_lib.latent_shape(stage.config))).astype(np.float32)

    def first_layer(cond):
        inp = conditioning.stage_input(2, x, cond["first"], cond["cond"])
        kw = {k: v for k, v in cond.items() if k not in ("first", "cond", "context")}
        _, inter = model.apply({"params": params}, inp, np.array([500.0], np.float32), cond["context"], **kw,
                               capture_intermediates=lambda m, _: isinstance(m, ttm_layers.MaskedCrossAttention),
                               mutable=["intermediates"])
        return np.asarray(inter["intermediates"]["blocks_0"]["masked_cross_attn"]["__call__"][0])[0]

    with contextlib.ExitStack() as stack:
        stack.enter_context(nn.logical_axis_rules(stage.rules))
        out_a, out_b = (first_layer(jax.device_get(cnd)) for cnd in conds)
    changed = np.abs(out_a - out_b).max(-1)  # [N]
    assert changed[cross == 2].min() > 1e-4  # every object-2 token sees the new prompt
    assert changed[cross != 2].max() == 0.0  # no other token does


def test_sample_entry_point_with_a_jsonl_batch(pipe, inputs, tmp_path):
    s1, s2 = pipe.s1.stage.workdir, pipe.s2.stage.workdir
    lines = [{"image": inputs["image"], "caption": inputs["caption"], "masks": inputs["masks"], "name": "a"},
             {"image": inputs["image"], "caption": inputs["caption"].split(" while ")[0] + ".",
              "boxes": [[0, 0, 32, 32]], "labels": ["thing"], "seed": 3, "name": "b"}]
    jsonl = tmp_path / "requests.jsonl"
    jsonl.write_text("".join(json.dumps(x) + "\n" for x in lines))
    config = run_config(s1, s2, requests=str(jsonl), batch_size=B, num_steps=3)
    records = run.sample(config, str(tmp_path / "out"), pipe=pipe)
    assert [r["name"] for r in records] == ["a", "b"]
    assert video_io.read_frames(records[1]["video"]).shape == (FRAMES, SIZE, SIZE, 3)
    assert records[1]["masks"] == "boxes" and len(records[1]["local_prompts"]) == 1
    lines_out = (tmp_path / "out" / "samples.jsonl").read_text().splitlines()
    assert [json.loads(x)["name"] for x in lines_out] == ["a", "b"]


def run_config(s1, s2, **sample):
    import importlib.util

    spec = importlib.util.spec_from_file_location("sample_config", ROOT / "configs" / "sample.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.sample.stage1_workdir, config.sample.stage2_workdir = s1, s2
    for k, v in sample.items():
        config.sample[k] = v
    return config


def test_validate_names_fields(tmp_path):
    config = run_config("", "")
    with pytest.raises(config_lib.ConfigError, match="config.sample.stage1_workdir: empty"):
        run.validate(config)
    (tmp_path / "checkpoints").mkdir()
    config = run_config(str(tmp_path), str(tmp_path), image=str(tmp_path / "nope.png"))
    with pytest.raises(config_lib.ConfigError, match="config.sample.image: .*nope.png' does not exist"):
        run.validate(config)
    config = run_config(str(tmp_path), str(tmp_path), requests=__file__, schedule="cosine")
    with pytest.raises(config_lib.ConfigError, match="config.sample.schedule: 'cosine'"):
        run.validate(config)
    with pytest.raises(config_lib.ConfigError, match="config.sample.boxes: box 0"):
        run.parse_boxes("1,2,3")


def test_masks_from_sav_json_and_coco_rle(tmp_path, inputs):
    v = synthetic.make_video(3, 0, height=SIZE, width=SIZE, frames=FRAMES)
    ann = v.annotation["manual"]
    path = tmp_path / "sav_000001_manual.json"
    path.write_text(json.dumps(ann))
    req = requests_lib.Request(image=v.frames[0], caption="x", masks=str(path))
    half = SIZE // 2
    masks, labels, source = requests_lib.load_masks(req, (SIZE, SIZE), half, half)
    assert masks.shape == (half, half, len(v.scene.objects)) and "sa-v" in source
    want = v.masks[0, ::2, ::2]  # annotated frame 0, nearest-neighbour halving
    assert (masks == want).mean() > 0.97
    rles = [{"segmentation": {"size": r["size"], "counts": r["counts"]}, "label": f"obj{k}"}
            for k, r in enumerate(mask_utils.encode(np.asfortranarray(v.masks[0].astype(np.uint8))))]
    for r in rles:
        r["segmentation"]["counts"] = r["segmentation"]["counts"].decode()
    path = tmp_path / "coco.json"
    path.write_text(json.dumps(rles))
    masks, labels, _ = requests_lib.load_masks(requests_lib.Request(image=v.frames[0], caption="x", masks=str(path)),
                                           (SIZE, SIZE), SIZE, SIZE)
    np.testing.assert_array_equal(masks, v.masks[0])
    assert labels == [f"obj{k}" for k in range(len(rles))]
    inline, inline_labels, _ = requests_lib.load_masks(requests_lib.Request(image=v.frames[0], caption="x", masks=rles),
                                                   (SIZE, SIZE), SIZE, SIZE)  # a JSONL request's inline RLEs
    np.testing.assert_array_equal(inline, v.masks[0])
    assert inline_labels == labels
    with pytest.raises(ValueError, match="neither masks nor boxes"):
        requests_lib.load_masks(requests_lib.Request(image=v.frames[0], caption="x"), (SIZE, SIZE), SIZE, SIZE)


def test_requests_jsonl_errors_name_the_line(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"image": "a.png", "caption": "the cat jumps", "boxes": [[0, 0, 4, 4]]}\n\n'
                    '{"image": "a.png", "caption": "x", "colour": "red"}\n')
    with pytest.raises(ValueError, match=r"r.jsonl:3: unknown key\(s\) \['colour'\]"):
        requests_lib.read_requests(str(path))
    path.write_text('{"image": "a.png", "caption": "x", "name": "v"}\n'
                    '{"image": "b.png", "caption": "y", "name": "v"}\n')
    with pytest.raises(ValueError, match=r"names \['v'\] repeat"):
        requests_lib.read_requests(str(path))
    path.write_text('# two requests\n{"image": "a.png", "caption": "x"}\n{"image": "/abs/b.png", "caption": "y"}\n')
    reqs = requests_lib.read_requests(str(path))
    assert [r.image for r in reqs] == [str(tmp_path / "a.png"), "/abs/b.png"]  # relative to the JSONL's folder
    assert [r.name for r in reqs] == ["r_0002", "r_0003"]


def test_jsonl_keeps_going_crops_other_aspects_and_reruns_skip_done(pipe, inputs, tmp_path, capsys):
    """Bad lines of a requests JSONL are reported and skipped while the good ones are generated; a 2:1 image is
    centre-cropped (its masks too) and the console line and the record say so; `samples.jsonl` holds every line's
    status; a failed generation fails its own request only; a re-run skips the requests already done."""
    s1, s2 = pipe.s1.stage.workdir, pipe.s2.stage.workdir
    d = tmp_path / "in"
    d.mkdir()
    frame = np.asarray(Image.open(inputs["image"]))
    pad = SIZE // 2  # the frame in the middle of a 2:1 image: its centre crop is the frame itself
    wide = np.pad(frame, ((0, 0), (pad, pad), (0, 0)), constant_values=128)
    Image.fromarray(wide).save(d / "wide.png")
    wide_masks = []
    for p in inputs["masks"]:
        m = np.pad(np.asarray(Image.open(p)), ((0, 0), (pad, pad)))
        Image.fromarray(m).save(d / pathlib.Path(p).name)
        wide_masks.append(str(d / pathlib.Path(p).name))
    Image.fromarray(np.zeros((SIZE // 2, SIZE), np.uint8)).save(d / "small.png")
    good = {"image": inputs["image"], "caption": inputs["caption"], "masks": inputs["masks"]}
    lines = [json.dumps({**good, "image": str(d / "wide.png"), "masks": wide_masks, "name": "wide"}),
             '{"image": "frame.png", "caption": }',
             json.dumps({**good, "image": str(d / "missing.png"), "name": "missing"}),
             json.dumps({**good, "masks": [*inputs["masks"], str(d / "small.png")], "name": "sizes"}),
             json.dumps({**good, "boxes": [[0, 0, 16, 16]], "labels": ["thing"], "masks": None, "name": "box",
                         "caption": inputs["caption"].split(" while ")[0] + "."})]
    jsonl = d / "requests.jsonl"
    jsonl.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    config = run_config(s1, s2, requests=str(jsonl), batch_size=B, num_steps=3)
    records = run.sample(config, str(out), pipe=pipe)
    said = capsys.readouterr()

    statuses = [r["status"] for r in records]
    assert statuses[0] == "done" and statuses[4] == "done"
    assert statuses[1].startswith("skipped: ") and "requests.jsonl:2: not JSON" in statuses[1]
    assert statuses[2].startswith("skipped: ") and "missing.png' does not exist" in statuses[2]
    assert statuses[3].startswith("skipped: ") and "small.png' is 32x16 (WxH) but the image is 32x32" in statuses[3]
    for n in (2, 3, 4):
        assert len([x for x in said.err.splitlines() if x.startswith("skipped") and f"requests.jsonl:{n}" in x]) == 1
    saved = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert [(r["name"], r["status"]) for r in saved] == [(r["name"], r["status"]) for r in records]
    assert all(pathlib.Path(saved[i][k]).is_file() for i in (0, 4) for k in ("video", "side_by_side", "json"))
    assert all(saved[i]["video"] is None for i in (1, 2, 3))

    # the 2:1 request: cropped as training crops clips, and said so (console line, record, <name>.json)
    wide_rec = records[0]
    assert wide_rec["crop"]["box"] == [pad, 0, pad + SIZE, SIZE] and "centre-cropped" in wide_rec["crop"]["note"]
    assert json.loads(pathlib.Path(wide_rec["json"]).read_text())["crop"] == wide_rec["crop"]
    wrote = [x for x in said.out.splitlines() if x.startswith(f"wrote {wide_rec['video']}")]
    assert len(wrote) == 1 and "centre-cropped" in wrote[0]
    side = video_io.read_frames(wide_rec["side_by_side"])
    assert side.shape == (FRAMES, SIZE, 3 * SIZE, 3)
    assert np.abs(side[:, :, :SIZE].astype(np.float32) - frame.astype(np.float32)).mean() < 8  # the crop, unsquashed
    assert wide_rec["local_prompts"] == inputs["local"][::-1]  # masks cropped with the image, matched as before

    # re-run: "sizes" fixed, and a request whose video cannot be written (its path is a folder) fails on its own
    stamps = {k: pathlib.Path(records[i][k]).stat().st_mtime_ns for i in (0, 4) for k in ("video", "json")}
    lines[3] = json.dumps({**good, "name": "sizes"})
    lines.append(json.dumps({**good, "name": "blocked"}))
    (out / "blocked.mp4").mkdir()
    jsonl.write_text("\n".join(lines) + "\n")
    again = run.sample(config, str(out), pipe=pipe)
    said = capsys.readouterr()
    assert [r["status"].split(":")[0] for r in again] == ["done", "skipped", "skipped", "done", "done", "failed"]
    assert "blocked.mp4" in again[5]["status"] and again[5]["video"] is None
    assert {k: pathlib.Path(again[i][k]).stat().st_mtime_ns for i in (0, 4) for k in ("video", "json")} == stamps
    assert len([x for x in said.out.splitlines() if x.startswith("already done")]) == 2
    assert [x.split(" ")[1] for x in said.out.splitlines() if x.startswith("wrote")] == [again[3]["video"]]
    assert len([x for x in said.err.splitlines() if x.startswith("failed") and "requests.jsonl:6" in x]) == 1
    saved = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert [r["status"] for r in saved] == [r["status"] for r in again]
