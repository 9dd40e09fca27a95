"""The paper's central claim (Table 3) on our own synthetic data, in one command.

    python bench/reproduce.py --workdir=DIR [--preset=quick|smoke|full] [--seeds=0,1,2]

For each training seed it trains, at equal compute (same steps, batch, data and data order; only `config.seed`,
the initialisation and the noise, changes between seeds):

  stage 1                       one per seed, shared by every TTM row (its compute is reported apart)
  ttm                           stage 2, both added layers masked
  no_masked_attention           stage 2, `model.ttm_masked=False`
  masked_cross_only             stage 2, `model.ttm_masked_self=False`
  masked_self_only              stage 2, `model.ttm_masked_cross=False`
  ti2v                          stage 0 (`configs/ti2v.py`): one stage, no trajectory, added layers unmasked

then builds the held-out multi-object benchmark (`ttm_jax.eval.motion_bench`: generator seeds never used in
training), generates every scene with every row (`configs/sample.py` requests; TTM rows run stage 1 then stage 2),
judges the videos by the objects' known colours (`ttm_jax.eval.judge`: binding accuracy, trajectory IoU; for TTM rows
also stage 1's trajectory IoU against the ground-truth masks); every stage-2 row also generates each scene from the
ground-truth trajectory in place of stage 1's (rows "<row> (GT trajectory)": what stage 2 and its masked layers do
with a right trajectory, the stage-2 half of Table 3 with stage 1's errors taken out), and writes
`DIR/results.json`, `DIR/results.md` (mean and 95% interval over seeds, numbers of scenes and objects) and
`DIR/side_by_side.gif` (first frame | ground truth | each row, a few scenes). Every step is resumable: re-running
skips trained runs (their workdirs reach
`total_steps`), generated videos (`samples.jsonl`) and a finished benchmark.

Presets: `smoke` (minutes: checks the machinery, says nothing about the claim), `quick` (the CPU preset on the full
synthetic set), `binding` (the binding rung of the ladder, `config.data.synthetic_rung=3`, each stage's tiny defaults
at a CPU budget), `full` (sized for an accelerator). The figures it prints are for the preset it ran;
docs/results.md states which.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import sys
import time

import numpy as np
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()  # Grain reads absl flags

from ttm_jax import config as config_lib  # noqa: E402
from ttm_jax.data import trajectory as trajectory_lib  # noqa: E402
from ttm_jax.data import video_io  # noqa: E402
from ttm_jax.eval import judge, motion_bench  # noqa: E402
from ttm_jax.inference import pipeline as pipeline_lib  # noqa: E402
from ttm_jax.inference import requests as requests_lib  # noqa: E402
from ttm_jax.inference import run as sample_run  # noqa: E402
from ttm_jax.train import loop  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Preset:
    steps: int  # training steps of every run
    num_videos: int  # synthetic training videos (shared by every run)
    scenes: int  # held-out benchmark scenes
    sample_steps: int  # sampler steps at generation
    variant: str = "tiny"
    model: tuple = ()  # (config.model field, value) overrides of the stage-2 and TI2V runs (stage 1 keeps its own)
    stage1_steps: int = 0  # stage 1's training steps (0: `steps`); its LR cooldown keeps its share of the run
    rung: int = 4  # config.data.synthetic_rung of every run and of the held-out scenes (synthetic.RUNGS)


PRESETS = {
    "smoke": Preset(steps=30, num_videos=16, scenes=4, sample_steps=4),
    # the tiny variant at 2x2 patches and dim 256: 4x fewer tokens, about twice the tiny default's steps/s here
    "quick": Preset(steps=600, num_videos=1000, scenes=16, sample_steps=20,
                    model=(("dim", 256), ("ffn_dim", 512), ("num_heads", 4), ("patch_size", (1, 2, 2)))),
    "full": Preset(steps=20_000, num_videos=4096, scenes=64, sample_steps=50),
    # the binding rung of the ladder (two or three plain objects, each its own direction) with the tiny defaults of
    # each stage at a budget that fits a 2-core CPU: stage 1 at half its default steps, stage 2 at 400
    "binding": Preset(steps=400, stage1_steps=1000, num_videos=1000, scenes=16, sample_steps=20, rung=3),
}

GT = " (GT trajectory)"  # rows of stage 2 given the ground-truth trajectory instead of stage 1's

# row -> (stage, config overrides)
ROWS = {
    "ttm": (2, {}),
    "no_masked_attention": (2, {"model.ttm_masked": False}),
    "masked_cross_only": (2, {"model.ttm_masked_self": False}),
    "masked_self_only": (2, {"model.ttm_masked_cross": False}),
    "ti2v": (0, {}),
}


def run_config(stage: int, seed: int, preset: Preset, data_dir: str, overrides: dict) -> config_lib.ml_collections:
    c = config_lib.build(stage, preset.variant)
    c.seed = seed
    steps = preset.stage1_steps if stage == 1 and preset.stage1_steps else preset.steps
    config_lib.set_total_steps(c, steps)
    c.train.checkpoint_every_steps = max(1, steps // 2)
    c.train.sample_every_steps = 0
    c.data.synthetic_num_videos = preset.num_videos
    c.data.synthetic_rung = preset.rung
    if stage != 1:
        for field, value in preset.model:
            c.model[field] = value
    c.data.synthetic_dir = data_dir  # one synthetic dataset for every run and seed; data order fixed by shuffle_seed
    for key, value in overrides.items():
        section, field = key.split(".")
        c[section][field] = value
    return config_lib.validate(c)


def train_run(name: str, config, workdir: str, timings: dict) -> None:
    start = time.time()
    res = loop.train(config, workdir)
    took = time.time() - start
    if res.final_step > res.start_step:  # a resumed, finished run costs nothing this time
        timings[name] = timings.get(name, 0.0) + took
    print(f"[{name}] steps {res.start_step}->{res.final_step} in {took:.0f} s", flush=True)


def sample_config(**fields):
    spec = importlib.util.spec_from_file_location("sample_config", os.path.join(REPO, "configs", "sample.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.sample.update(fields)
    return config


def oracle_videos(config, bench: motion_bench.Benchmark, out_dir: str) -> dict[str, str]:
    """Stage 2 of `config.sample` given each scene's ground-truth trajectory instead of stage 1's (the same requests,
    seeds and sampler settings as the two-stage run): what stage 2 and its masked layers do with a right trajectory.
    Writes `<out_dir>/<scene>.mp4`; returns scene name -> path."""
    s = config.sample
    os.makedirs(out_dir, exist_ok=True)
    pipe = pipeline_lib.Pipeline.from_workdirs(s.stage1_workdir, s.stage2_workdir, sample_run.settings_from_config(s))
    out = {}
    for req in requests_lib.read_requests(s.requests):
        path = os.path.join(out_dir, f"{req.name}.mp4")
        if not os.path.exists(path):
            req.seed = int(req.seed) + int(s.seed)
            item = pipe.prepare(req)
            ids = trajectory_lib.ids_from_masks(bench.scene(req.name).masks())[None]
            video = pipe.run_stage2([item], ids)[0]
            video_io.write_video(path + ".tmp.mp4", video, fps=pipe.fps)
            os.replace(path + ".tmp.mp4", path)
        out[req.name] = path
    return out


def middle_panel(side_by_side: np.ndarray, width: int) -> np.ndarray:
    """`[T, H, 3W, 3]` (input | trajectory | video) -> the trajectory `[T, H, W, 3]`."""
    return side_by_side[:, :, width:2 * width]


def interval(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and the half-width of a 95% t-interval (None with fewer than 2 values)."""
    xs = [v for v in values if v is not None and not math.isnan(v)]
    if not xs:
        return None, None
    mean = float(np.mean(xs))
    if len(xs) < 2:
        return mean, None
    t975 = {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776}.get(len(xs), 2.262)  # df = n - 1
    return mean, float(t975 * np.std(xs, ddof=1) / math.sqrt(len(xs)))


def fmt(mean: float | None, half: float | None) -> str:
    if mean is None:
        return "-"
    return f"{mean:.3f}" + (f" ± {half:.3f}" if half is not None else "")


def write_gif(path: str, bench: motion_bench.Benchmark, videos: dict[str, dict[str, str]], rows: list[str],
              num: int = 4) -> None:
    """A few scenes, one strip per frame: first frame | ground truth | each row's video (seed 0)."""
    strips = []
    for scene in bench.scenes[:num]:
        gt = scene.video()
        panels = [np.broadcast_to(gt[:1], gt.shape), gt]
        for row in rows:
            video = videos.get(row, {}).get(scene.name)
            panels.append(video_io.read_frames(video) if video else np.zeros_like(gt))
        strips.append(np.concatenate(panels, axis=2))
    frames = np.concatenate(strips, axis=1)  # [T, num*H, (2+rows)*W, 3]
    scale = max(1, 256 // frames.shape[1])
    images = [Image.fromarray(f).resize((f.shape[1] * scale, f.shape[0] * scale), Image.NEAREST) for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=250, loop=0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    p.add_argument("--seeds", default="0,1,2")
    args = p.parse_args()
    preset = PRESETS[args.preset]
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    root = os.path.abspath(args.workdir)
    os.makedirs(root, exist_ok=True)
    data_dir = os.path.join(root, "synthetic_sav")
    t0 = time.time()
    timings: dict[str, float] = {}

    # --- train ----------------------------------------------------------------------------------------------------
    for seed in seeds:
        train_run("stage1", run_config(1, seed, preset, data_dir, {}), os.path.join(root, f"seed{seed}", "stage1"),
                  timings)
        for row, (stage, overrides) in ROWS.items():
            train_run(row, run_config(stage, seed, preset, data_dir, overrides), os.path.join(root, f"seed{seed}", row),
                      timings)

    # --- benchmark, generation, judging ---------------------------------------------------------------------------
    d = run_config(2, 0, preset, data_dir, {}).data
    bench_dir = os.path.join(root, "benchmark")
    bench = motion_bench.make_benchmark(bench_dir, preset.scenes, seed=0, height=int(d.height), width=int(d.width),
                                        frames=int(d.num_frames), fps=float(d.fps), rung=preset.rung)
    requests = os.path.join(bench_dir, "requests.jsonl")
    per_seed: dict[str, list[dict]] = {row: [] for row in ROWS}
    per_seed.update({row + GT: [] for row, (stage, _) in ROWS.items() if stage != 0})
    videos_seed0: dict[str, dict[str, str]] = {}
    for seed in seeds:
        for row, (stage, _) in ROWS.items():
            out = os.path.join(root, f"seed{seed}", "samples", row)
            s1 = "" if stage == 0 else os.path.join(root, f"seed{seed}", "stage1")
            config = sample_config(stage1_workdir=s1, stage2_workdir=os.path.join(root, f"seed{seed}", row),
                                   requests=requests, num_steps=preset.sample_steps, seed=seed)
            start = time.time()
            records = sample_run.sample(config, out)
            timings[f"generate/{row}"] = timings.get(f"generate/{row}", 0.0) + time.time() - start
            done = {r["name"]: r for r in records if r.get("status") == "done"}
            videos = {n: r["video"] for n, r in done.items()}
            trajectories = None
            if stage != 0:
                trajectories = {n: middle_panel(video_io.read_frames(r["side_by_side"]), int(d.width))
                                for n, r in done.items()}
            verdict = judge.judge_benchmark(bench_dir, videos, trajectories=trajectories)
            per_seed[row].append(verdict["overall"])
            if seed == seeds[0]:
                videos_seed0[row] = videos
            print(f"[seed {seed}] {row}: binding accuracy {verdict['overall']['binding_accuracy']}, "
                  f"trajectory IoU {verdict['overall']['trajectory_iou']}", flush=True)
            if stage != 0:  # the same stage 2 given the ground-truth trajectory: its own share of the errors
                start = time.time()
                gt_videos = oracle_videos(config, bench, os.path.join(root, f"seed{seed}", "samples_gt_trajectory",
                                                                      row))
                timings[f"generate/{row}+gt"] = timings.get(f"generate/{row}+gt", 0.0) + time.time() - start
                verdict = judge.judge_benchmark(bench_dir, gt_videos)
                per_seed[row + GT].append(verdict["overall"])
                if seed == seeds[0]:
                    videos_seed0[row + GT] = gt_videos
                print(f"[seed {seed}] {row}{GT}: binding accuracy {verdict['overall']['binding_accuracy']}", flush=True)

    # --- report ---------------------------------------------------------------------------------------------------
    table = {}
    for row, overall in per_seed.items():
        table[row] = {
            "binding_accuracy": interval([o["binding_accuracy"] for o in overall]),
            "video_iou": interval([o["mean_iou"] for o in overall]),
            "trajectory_iou": interval([o["trajectory_iou"] for o in overall]),
            "per_seed": overall,
            "scenes": overall[0]["num_scenes"] if overall else 0,
            "objects": overall[0]["num_objects"] if overall else 0,
        }
    static = per_seed["ttm"][0]["static_share"] if per_seed["ttm"] else None
    wall = time.time() - t0
    result = {"preset": dataclasses.asdict(preset) | {"name": args.preset}, "seeds": seeds, "rows": table,
              "static_share": static, "timings_s": timings, "wall_s": wall}
    with open(os.path.join(root, "results.json"), "w") as f:
        json.dump(result, f, indent=2, default=str)
    lines = [f"# Table 3 on held-out synthetic scenes ({args.preset}: {preset.steps} steps"
             + (f", stage 1 {preset.stage1_steps}" if preset.stage1_steps else "") + f", {preset.num_videos} "
             f"training videos, rung {preset.rung}, {preset.scenes} scenes, seeds {seeds})", "",
             "| row | binding accuracy | video IoU | stage-1 trajectory IoU | scenes | objects |",
             "|---|---|---|---|---|---|"]
    for row, r in table.items():
        lines.append(f"| {row} | {fmt(*r['binding_accuracy'])} | {fmt(*r['video_iou'])} | "
                     f"{fmt(*r['trajectory_iou'])} | {r['scenes']} | {r['objects']} |")
    lines += ["", f"A video that never moves scores {static:.3f} binding accuracy (the share of still objects)."
              if static is not None else "", f"Wall time {wall / 60:.1f} min (this run; resumed steps not counted): "
              + ", ".join(f"{k} {v / 60:.1f} min" for k, v in sorted(timings.items()))]
    with open(os.path.join(root, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    write_gif(os.path.join(root, "side_by_side.gif"), bench, videos_seed0, list(per_seed))
    print("\n".join(lines))
    print(f"wrote {root}/results.md, results.json, side_by_side.gif")


if __name__ == "__main__":
    main()
