"""`sample(config, workdir)`: the `job == "sample"` entry point (`python -m ttm_jax.main --config=configs/sample.py`).

Reads the request(s) from `config.sample`, rebuilds both stages from their workdirs, plans the prompts (LLM at
`sample.llm_url`, else offline), generates and writes `<workdir>/<name>.mp4`, `<name>_side_by_side.mp4` and
`<name>.json` per request, and `<workdir>/samples.jsonl` with every record. `validate(config)` checks the settings
before any model is loaded.
"""

from __future__ import annotations

import json
import os

import ml_collections

from ttm_jax.config import ConfigError
from ttm_jax.diffusion import samplers
from ttm_jax.inference import llm
from ttm_jax.inference import pipeline as pipeline_lib
from ttm_jax.inference import requests as requests_lib

MATCH_RULES = ("auto", "label", "colour", "order")


def _check(cond: bool, field: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"config.sample.{field}: {msg}")


def parse_boxes(text: str) -> list[list[float]]:
    """`"x0,y0,x1,y1;x0,y0,x1,y1"` -> `[[x0, y0, x1, y1], ...]`."""
    out = []
    for i, part in enumerate(p for p in text.split(";") if p.strip()):
        try:
            box = [float(v) for v in part.split(",")]
        except ValueError:
            box = []
        _check(len(box) == 4, "boxes", f"box {i} {part!r} is not four numbers x0,y0,x1,y1 (boxes are separated by ;)")
        out.append(box)
    return out


def _split(text: str, sep: str = ",") -> list[str]:
    return [p.strip() for p in text.split(sep) if p.strip()]


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Raise `ConfigError` naming the field and the fix for any sampling setting that cannot work."""
    if config.get("job", "") != "sample" or "sample" not in config:
        raise ConfigError("config.job: sampling needs configs/sample.py (job='sample', a `sample` section)")
    s = config.sample
    for stage in (1, 2):
        wd = s.get(f"stage{stage}_workdir", "")
        _check(bool(wd), f"stage{stage}_workdir",
               f"empty; set it to the workdir of a trained stage-{stage} run "
               f"(python -m ttm_jax.main --config=configs/stage{stage}.py --workdir=DIR)")
        _check(os.path.isdir(os.path.join(wd, "checkpoints")), f"stage{stage}_workdir",
               f"{wd!r} has no checkpoints/ folder; train stage {stage} there first")
    if s.requests:
        _check(os.path.exists(s.requests), "requests", f"{s.requests!r} does not exist (a JSONL of requests)")
    else:
        _check(bool(s.image), "image", "empty; give the first frame (or a JSONL in config.sample.requests)")
        _check(os.path.exists(s.image), "image", f"{s.image!r} does not exist")
        _check(bool(s.caption.strip()), "caption", "empty; describe the motion, e.g. 'the red square slides left'")
        _check(bool(s.masks) or bool(s.boxes), "masks",
               "neither masks nor boxes given; set config.sample.masks (PNGs, SA-V json, COCO RLE json) or "
               "config.sample.boxes ('x0,y0,x1,y1;...')")
        if s.boxes:
            parse_boxes(s.boxes)
        if s.masks and not s.masks.endswith(".json") and ".json:" not in s.masks:
            for p in _split(s.masks):
                _check(os.path.exists(p), "masks", f"{p!r} does not exist")
    _check(isinstance(s.num_steps, int) and s.num_steps >= 1, "num_steps", f"{s.num_steps!r} must be an int >= 1")
    _check(s.schedule in samplers.SCHEDULES, "schedule", f"{s.schedule!r}; choose one of {samplers.SCHEDULES}")
    _check(s.shift > 0, "shift", f"{s.shift} must be > 0 (1: no shift)")
    _check(s.image_scale >= 0 and s.text_scale >= 0, "image_scale",
           f"image_scale={s.image_scale}, text_scale={s.text_scale} must be >= 0 (1, 1: no guidance)")
    _check(s.match in MATCH_RULES, "match", f"{s.match!r}; choose one of {MATCH_RULES}")
    _check(isinstance(s.batch_size, int) and s.batch_size >= 1, "batch_size", f"{s.batch_size!r} must be >= 1")
    if s.llm_url:
        _check(s.llm_url.startswith(("http://", "https://")), "llm_url",
               f"{s.llm_url!r} must start with http:// or https:// (e.g. http://localhost:8000)")
        _check(s.llm_timeout > 0, "llm_timeout", f"{s.llm_timeout} must be > 0 seconds")
    return config


def requests_from_config(s: ml_collections.ConfigDict) -> list[requests_lib.Request]:
    if s.requests:
        reqs = requests_lib.read_requests(s.requests)
        for r in reqs:  # the config's seed offsets every request's own
            r.seed = int(r.seed) + int(s.seed)
        return reqs
    masks = None
    if s.masks:
        masks = s.masks if (s.masks.endswith(".json") or ".json:" in s.masks) else _split(s.masks)
    return [requests_lib.Request(
        image=s.image, caption=s.caption, masks=masks, boxes=parse_boxes(s.boxes) if s.boxes else None,
        labels=_split(s.labels) or None, motion_prompt=s.motion_prompt or None,
        local_prompts=_split(s.local_prompts, "|") or None, seed=int(s.seed), name=s.name)]


def settings_from_config(s: ml_collections.ConfigDict) -> pipeline_lib.Settings:
    return pipeline_lib.Settings(num_steps=int(s.num_steps), schedule=s.schedule, shift=float(s.shift),
                                 image_scale=float(s.image_scale), text_scale=float(s.text_scale))


def build_pipeline(config: ml_collections.ConfigDict) -> pipeline_lib.Pipeline:
    s = config.sample
    client = None
    if s.llm_url:
        client = llm.ChatClient(s.llm_url, model=s.llm_model, timeout=float(s.llm_timeout),
                                retries=int(s.llm_retries), api_key=s.llm_api_key, seed=int(s.seed))
    return pipeline_lib.Pipeline.from_workdirs(s.stage1_workdir, s.stage2_workdir, settings_from_config(s),
                                               llm_client=client, match=s.match,
                                               anchor_first_frame=bool(s.anchor_first_frame),
                                               batch_size=int(s.batch_size), ema=bool(s.get("ema", True)))


def sample(config: ml_collections.ConfigDict, workdir: str, *,
           pipe: pipeline_lib.Pipeline | None = None) -> list[dict]:
    """Generate every request of `config.sample` into `workdir`; returns the JSON records. `pipe`: an already built
    `build_pipeline(config)` (notebooks and tests reuse its compiled functions across calls)."""
    validate(config)
    requests = requests_from_config(config.sample)
    pipe = pipe or build_pipeline(config)
    records = pipe.generate(requests, workdir)
    with open(os.path.join(workdir, "samples.jsonl"), "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    for r in records:
        pairs = "; ".join(f"object {o['object_id']} ({o['mask_label'] or 'unlabelled'}) <- {o['local_prompt']!r} "
                          f"[{o['matched_by']}]" for o in r["objects"])
        print(f"wrote {r['video']} and {r['side_by_side']}; {r['planner']} motion prompt {r['motion_prompt']!r}; "
              f"{pairs}", flush=True)
    return records
