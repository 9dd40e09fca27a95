"""`sample(config, workdir)`: the `job == "sample"` entry point (`python -m ttm_jax.main --config=configs/sample.py`).

Reads the request(s) from `config.sample`, checks every one against the configs saved in the stage workdirs and plans
its prompts (LLM at `sample.llm_url`, else offline) before any model is loaded, then rebuilds both stages, generates
and writes `<workdir>/<name>.mp4`, `<name>_side_by_side.mp4` and `<name>.json` per request. `validate(config)` checks
the settings first.

A requests JSONL is not all-or-nothing: a bad line (not JSON, not a request, a missing or unreadable image, masks that
do not fit, too many objects, a caption the planner cannot read, a failed generation) is reported on one line naming
its line and the reason, and skipped; the others are generated. `<workdir>/samples.jsonl` always holds one record per
request line with its `status` (`done`, `skipped: <reason>`, `failed: <reason>`, `pending` while the run is under way)
and its output paths; it is rewritten as each request finishes. A re-run into the same workdir skips the requests
recorded there as done whose outputs are present and whose request and sampling settings are unchanged
(`request_key`). A single request given by `config.sample.image` etc. raises its error instead (a `ConfigError` naming
the `config.sample` field).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections
import numpy as np
from etils import epath

from ttm_jax import storage
from ttm_jax.clients import llm, segment
from ttm_jax.config import ConfigError
from ttm_jax.diffusion import samplers
from ttm_jax.inference import pipeline as pipeline_lib
from ttm_jax.inference import requests as requests_lib

MATCH_RULES = ("auto", "label", "colour", "order")
SAMPLES_FILE = "samples.jsonl"
# config.sample fields that say what one request is (its key holds the request's own fields instead), or that do not
# change what is generated
_NOT_IN_KEY = ("image", "caption", "masks", "boxes", "labels", "motion_prompt", "local_prompts", "requests", "name",
               "llm_api_key", "llm_timeout", "llm_retries", "batch_size")


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
    # stage 1 may be left empty when stage2_workdir holds the single-stage TI2V baseline (configs/ti2v.py)
    single = not s.get("stage1_workdir", "") and bool(s.get("stage2_workdir", ""))
    for stage in (2,) if single else (1, 2):
        wd = s.get(f"stage{stage}_workdir", "")
        _check(bool(wd), f"stage{stage}_workdir",
               f"empty; set it to the workdir of a trained stage-{stage} run "
               f"(python -m ttm_jax.main --config=configs/stage{stage}.py --workdir=DIR)"
               + ("; for the single-stage TI2V baseline set only stage2_workdir" if stage == 1 else ""))
        _check(epath.Path(wd, "checkpoints").is_dir(), f"stage{stage}_workdir",
               f"{wd!r} has no checkpoints/ folder; train stage {stage} there first")
    if s.requests:
        _check(os.path.exists(s.requests), "requests", f"{s.requests!r} does not exist (a JSONL of requests)")
    else:
        _check(bool(s.image), "image", "empty; give the first frame (or a JSONL in config.sample.requests)")
        _check(os.path.exists(s.image), "image", f"{s.image!r} does not exist")
        _check(bool(s.caption.strip()), "caption", "empty; describe the motion, e.g. 'the red square slides left'")
        _check(bool(s.masks) or bool(s.boxes) or bool(s.get("detector_path", "")), "masks",
               "neither masks nor boxes given; set config.sample.masks (PNGs, SA-V json, COCO RLE json) or "
               "config.sample.boxes ('x0,y0,x1,y1;...'), or config.sample.detector_path to find the objects")
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
    _check(0.0 <= float(s.get("guidance_rescale", 0.0)) <= 1.0, "guidance_rescale",
           f"{s.get('guidance_rescale')} must be in [0, 1] (0: off; 0.7 in the zero-terminal-SNR paper)")
    _check(s.match in MATCH_RULES, "match", f"{s.match!r}; choose one of {MATCH_RULES}")
    _check(isinstance(s.batch_size, int) and s.batch_size >= 1, "batch_size", f"{s.batch_size!r} must be >= 1")
    if s.llm_url:
        _check(s.llm_url.startswith(("http://", "https://")), "llm_url",
               f"{s.llm_url!r} must start with http:// or https:// (e.g. http://localhost:8000)")
        _check(s.llm_timeout > 0, "llm_timeout", f"{s.llm_timeout} must be > 0 seconds")
    return config


def request_lines(s: ml_collections.ConfigDict) -> list[requests_lib.RequestLine]:
    """The requests of `config.sample`: every line of the JSONL (`requests.read_request_lines`; bad ones with their
    error), or the one request its fields describe. The config's seed offsets every request's own."""
    if s.requests:
        lines = requests_lib.read_request_lines(s.requests)
        if not lines:
            raise ConfigError(f"config.sample.requests: {s.requests!r} holds no request; write one JSON object per "
                              f"line")
        for line in lines:
            if line.request is not None:
                line.request.seed = int(line.request.seed) + int(s.seed)
        return lines
    masks = None
    if s.masks:
        masks = s.masks if (s.masks.endswith(".json") or ".json:" in s.masks) else _split(s.masks)
    req = requests_lib.Request(
        image=s.image, caption=s.caption, masks=masks, boxes=parse_boxes(s.boxes) if s.boxes else None,
        labels=_split(s.labels) or None, motion_prompt=s.motion_prompt or None,
        local_prompts=_split(s.local_prompts, "|") or None, seed=int(s.seed), name=s.name,
        source=requests_lib.CONFIG_SOURCE)
    return [requests_lib.RequestLine(requests_lib.CONFIG_SOURCE, 0, s.name, req)]


def requests_from_config(s: ml_collections.ConfigDict) -> list[requests_lib.Request]:
    """The requests of `config.sample`, strictly: the first bad JSONL line raises `RequestError`."""
    if s.requests:
        reqs = requests_lib.read_requests(s.requests)
        for r in reqs:  # the config's seed offsets every request's own
            r.seed = int(r.seed) + int(s.seed)
        return reqs
    return [line.request for line in request_lines(s)]


def settings_from_config(s: ml_collections.ConfigDict) -> pipeline_lib.Settings:
    return pipeline_lib.Settings(num_steps=int(s.num_steps), schedule=s.schedule, shift=float(s.shift),
                                 image_scale=float(s.image_scale), text_scale=float(s.text_scale),
                                 guidance_rescale=float(s.get("guidance_rescale", 0.0)))


def llm_client(s: ml_collections.ConfigDict) -> llm.ChatClient | None:
    """The planner's LLM client (`sample.llm_url`), None for the offline planner."""
    if not s.llm_url:
        return None
    return llm.ChatClient(s.llm_url, model=s.llm_model, timeout=float(s.llm_timeout), retries=int(s.llm_retries),
                          api_key=s.llm_api_key, seed=int(s.seed))


def build_pipeline(config: ml_collections.ConfigDict, *, client: Any = None,
                   devices: Sequence[Any] | None = None) -> pipeline_lib.Pipeline:
    """Both stages loaded from their workdirs (`client`: the LLM client, default `llm_client(config.sample)`;
    `devices`: the stages' mesh, default all devices)."""
    s = config.sample
    client = client if client is not None else llm_client(s)
    return pipeline_lib.Pipeline.from_workdirs(s.stage1_workdir, s.stage2_workdir, settings_from_config(s),
                                               llm_client=client, match=s.match,
                                               anchor_first_frame=bool(s.anchor_first_frame),
                                               batch_size=int(s.batch_size), ema=bool(s.get("ema", True)),
                                               devices=devices)


def request_key(req: requests_lib.Request, s: ml_collections.ConfigDict) -> str:
    """A digest of what a request's outputs depend on: its own fields and the sampling settings of `config.sample`
    (not the request-defining fields, nor timeouts or batch size). A re-run reuses outputs only when it matches."""
    fields = {k: v for k, v in vars(req).items() if k != "source"}
    if isinstance(fields["image"], np.ndarray) or isinstance(fields["masks"], np.ndarray):
        return ""  # arrays: never reused
    settings = {k: v for k, v in s.to_dict().items() if k not in _NOT_IN_KEY}
    text = json.dumps({"request": fields, "sample": settings}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def previous_records(workdir: str) -> dict[str, dict]:
    """The records of `<workdir>/samples.jsonl` by request name (none when absent; unreadable lines ignored)."""
    path = os.path.join(workdir, SAMPLES_FILE)
    out: dict[str, dict] = {}
    if not os.path.isfile(path):
        return out
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and "name" in rec:
                out[str(rec["name"])] = rec
    return out


def is_done(rec: dict | None, key: str) -> bool:
    """Whether a previous record is `done` for a request of this `key`, with all its outputs present."""
    if not rec or rec.get("status") != "done" or not key or rec.get("request_key") != key:
        return False
    return all(rec.get(k) and os.path.isfile(rec[k]) for k in ("video", "side_by_side", "json"))


def write_records(workdir: str, records: list[dict]) -> None:
    """`<workdir>/samples.jsonl`, one record per line, replaced atomically."""
    lines = "".join(json.dumps(r) + "\n" for r in records)
    storage.write_bytes_atomic(os.path.join(workdir, SAMPLES_FILE), lines.encode())


def _say(status: str, line: requests_lib.RequestLine, reason: str) -> None:
    """One console line for a request that was not generated, naming its line (once) and the reason."""
    where = "" if line.source in reason else f" {line.source} ({line.name!r})"
    print(f"{status}{where}: {reason}", file=sys.stderr, flush=True)


def _report_done(rec: dict) -> None:
    pairs = "; ".join(f"object {o['object_id']} ({o['mask_label'] or 'unlabelled'}) <- {o['local_prompt']!r} "
                      f"[{o['matched_by']}]" for o in rec["objects"])
    crop = f"; {rec['crop']['note'].split(';')[0]}" if rec.get("crop") else ""
    print(f"wrote {rec['video']} and {rec['side_by_side']}; {rec['planner']} motion prompt {rec['motion_prompt']!r}; "
          f"{pairs}{crop}", flush=True)


def sample(config: ml_collections.ConfigDict, workdir: str, *,
           pipe: pipeline_lib.Pipeline | None = None,
           on_record: Callable[[dict], None] | None = None) -> list[dict]:
    """Generate every request of `config.sample` into `workdir` (module docstring); returns one record per request
    (line), in order, each with its `status`. Every request is checked and planned before any model is loaded; the
    stages are loaded only when some request is left to generate. `pipe`: an already built `build_pipeline(config)`
    (notebooks and tests reuse its compiled functions across calls). `on_record(record)` is called as each generated
    request finishes (done or failed), for a caller's progress line."""
    validate(config)
    if "://" in workdir:  # the videos, masks and statuses are written with local file calls
        raise ConfigError(f"--workdir={workdir}: sampling writes to a local folder; give a local --workdir (the stage "
                          f"workdirs it reads may be gs://) and copy the outputs to the bucket afterwards")
    s = config.sample
    lines = request_lines(s)
    single = not s.requests
    os.makedirs(workdir, exist_ok=True)
    geometry = pipe.geometry if pipe is not None else pipeline_lib.Geometry.from_workdirs(s.stage1_workdir,
                                                                                         s.stage2_workdir)
    client = pipe.llm if pipe is not None else llm_client(s)
    segmenter = segment.from_config(s, overlay_dir=workdir)
    previous = previous_records(workdir)
    records: list[dict] = []
    todo: list[tuple[int, pipeline_lib.Prepared]] = []
    keys: list[str] = []
    for j, line in enumerate(lines):
        key = request_key(line.request, s) if line.request is not None else ""
        keys.append(key)
        if line.request is None:
            error = " ".join(line.error.split())
            rec = pipeline_lib.status_record(None, f"skipped: {error}", name=line.name, source=line.source)
            _say("skipped", line, error)
        elif is_done(previous.get(line.name), key):
            rec = previous[line.name]
            print(f"already done {line.source} ({line.name!r}): {rec['video']}", flush=True)
        else:
            try:
                prepared = pipeline_lib.prepare_request(line.request, geometry, llm_client=client, match=s.match,
                                                        segmenter=segmenter)
            except Exception as e:  # noqa: BLE001 - any per-request error skips that request only
                if single:
                    raise
                rec = pipeline_lib.status_record(line.request, f"skipped: {pipeline_lib.reason(e)}")
                _say("skipped", line, pipeline_lib.reason(e))
            else:
                rec = pipeline_lib.status_record(line.request, "pending")
                todo.append((j, prepared))
                if prepared.inputs is not None and prepared.inputs.crop_note:
                    print(f"{line.source} ({line.name!r}): {prepared.inputs.crop_note}", flush=True)
        records.append(rec)
    write_records(workdir, records)
    if todo:
        pipe = pipe if pipe is not None else build_pipeline(config, client=client)

        def progress(i: int, rec: dict) -> None:
            j = todo[i][0]
            records[j] = {**rec, "request_key": keys[j]}
            write_records(workdir, records)
            if on_record is not None:
                on_record(records[j])
            if rec["status"] == "done":
                _report_done(rec)
            else:
                status, _, why = rec["status"].partition(": ")
                _say(status, lines[j], why)

        pipe.generate([p for _, p in todo], workdir, keep_going=not single, progress=progress)
    counts = {k: sum(r["status"].split(":")[0] == k for r in records) for k in ("done", "skipped", "failed")}
    print(f"{counts['done']} done, {counts['skipped']} skipped, {counts['failed']} failed of {len(records)} "
          f"request(s); statuses in {os.path.join(workdir, SAMPLES_FILE)}", flush=True)
    return records
