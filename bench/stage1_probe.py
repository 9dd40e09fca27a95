"""Does stage 1 generate trajectories? Train (or reuse) a stage-1 workdir, sample it, score it against the truth.

    python bench/stage1_probe.py --workdir=/tmp/s1 [--steps=600] [--override=objective.shift=3 ...]
        [--settings="lq20:schedule=linear_quadratic,num_steps=20;u20:schedule=uniform,num_steps=20,image_scale=1,
        text_scale=1"] [--num_train=8] [--num_heldout=16] [--bench_dir=/tmp/stage1_probe_bench] [--png_dir=DIR]

1. Training: when `--steps` is given and the workdir's latest checkpoint is below it, runs
   `python -m ttm_jax.main --config=configs/stage1.py --workdir=W --config.train.total_steps=N --config.<override>...`
   (a fresh workdir takes the overrides; an existing run resumes with them) and reports its wall time.
2. Scenes: `--num_train` clips from the run's own training data (its first batches, in training order) and
   `--num_heldout` scenes of the held-out motion benchmark (`ttm_jax/eval/motion_bench.py`, generator seeds never used
   in training) at the run's clip geometry, both as training-format batches (first frame, ground-truth trajectory,
   object masks, motion prompt tokens).
3. For every sampler setting (`--settings`: `name:key=value,...;...` with the keys of `pipeline.Settings`: num_steps,
   schedule, shift, image_scale, text_scale), stage 1 samples each scene exactly as the pipeline does
   (`pipeline.StageRunner`: the conditions `inputs.prepare` makes, two-scale guidance, the objective's sampler;
   noise seed = scene index), and the table reports per split:
     mse1+     MSE of the sampled latent on latent frames 1+ against the ground-truth trajectory latent
     rep       the same for "repeat the first frame" (s0's latent in every frame): the bar to beat
     iou       mean per-object IoU of the decoded trajectory with the ground-truth masks over the clip, frame 0
               anchored to the given masks as the pipeline does (`judge.trajectory_iou`)
     iou1+     the same over frames 1+ only; `rep` columns: the repeat-s0 baseline's IoU
     mov       iou1+ over the objects that move (their ground-truth masks change); `rep`: the baseline's
   and, for the held-out split, the bar above: the IoU of each object moving in its true direction at the
   generator's mean speed (`mean_speed_oracle`; the prompts state directions, not speeds)
4. Single-step x0 predictions (`--x0_times`, noise levels in [0, 1], 1 pure noise; `objective.time_at` maps them to
   the objective's time): MSE and IoU on latent frames 1+ of `objective.clean_estimate` (rectified flow
   `x_t - t v`, ddim_v `sqrt(a) x_t - sqrt(1 - a) v`), no guidance: what the denoiser knows at each noise level,
   independent of the sampler; and whether it changes with the prompt. Restarts (`--restart_times`): the ground
   truth noised to a level, then sampled to the end (`restart`): where sampling goes wrong.
5. PNG strips in `--png_dir` (default `<workdir>/probe`): per split and setting, one row per scene
   `first frame | ground-truth trajectory (9 frames) | sampled trajectory (9 frames, raw decode)`, 4x nearest.

Prints the table and writes it as `probe.json` beside the strips.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout, uninstalled

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from PIL import Image  # noqa: E402

from ttm_jax.assembly import inputs as inputs_lib  # noqa: E402
from ttm_jax.assembly import objectives  # noqa: E402
from ttm_jax.assembly.trained import load_stage  # noqa: E402
from ttm_jax.data import loader, synthetic  # noqa: E402
from ttm_jax.data import trajectory as trajectory_lib  # noqa: E402
from ttm_jax.diffusion import ddim  # noqa: E402
from ttm_jax.eval import judge, motion_bench  # noqa: E402
from ttm_jax.inference import pipeline as pipeline_lib  # noqa: E402
from ttm_jax.inference.requests import tokenize_prompts  # noqa: E402
from ttm_jax.models import tokenizer as tokenizer_lib  # noqa: E402
from ttm_jax.runtime import checkpoint as checkpoint_lib  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", None, "Stage-1 workdir (trained here when --steps asks for more).",
                               required=True)
_STEPS = flags.DEFINE_integer("steps", 0, "Train to this many steps first (0: use the workdir as it is).")
_OVERRIDES = flags.DEFINE_multi_string("override", [], "Config overrides for training, `key=value` "
                                       "(objective.shift=3, data.synthetic_num_videos=2000, ...).")
_CONFIG = flags.DEFINE_string("config", "configs/stage1.py", "Config file for a fresh workdir.")
_SETTINGS = flags.DEFINE_string(
    "settings", "default:;u20:schedule=uniform;u20_noguid:schedule=uniform,image_scale=1,text_scale=1",
    "`name:key=value,...` separated by `;`; keys of pipeline.Settings; unset keys: the run's config.sample.")
_NUM_TRAIN = flags.DEFINE_integer("num_train", 8, "Training clips to score.")
_NUM_HELDOUT = flags.DEFINE_integer("num_heldout", 16, "Held-out benchmark scenes to score.")
_BENCH_DIR = flags.DEFINE_string("bench_dir", "/tmp/stage1_probe_bench", "Held-out benchmark folder (made if "
                                 "absent; one per clip geometry: the geometry is appended to the name).")
_PNG_DIR = flags.DEFINE_string("png_dir", "", "Where strips and probe.json go; default <workdir>/probe.")
_X0_TIMES = flags.DEFINE_list("x0_times", ["0.98", "0.9", "0.7", "0.5", "0.3"],
                              "Noise levels (0-1, 1: pure noise) of the single-step x0 probe.")
_RESTART_TIMES = flags.DEFINE_list("restart_times", ["0.9", "0.7", "0.5"],
                                   "Noise levels (0-1) the restart probe starts from.")
_RESTART_STEPS = flags.DEFINE_integer("restart_steps", 10, "About this many sampler steps per restart.")
_PNG_ROWS = flags.DEFINE_integer("png_rows", 6, "Scenes per strip.")

SETTING_KEYS = {"num_steps": int, "schedule": str, "shift": float, "image_scale": float, "text_scale": float,
                "guidance_rescale": float}


def parse_settings(text: str, sample_config) -> list[tuple[str, pipeline_lib.Settings]]:
    """`name:key=value,...;...` -> named `pipeline.Settings`, unset keys from `config.sample`."""
    base = {k: SETTING_KEYS[k](sample_config.get(k, getattr(pipeline_lib.Settings, k))) for k in SETTING_KEYS}
    out = []
    for part in text.split(";"):
        part = part.strip()
        if not part:
            continue
        name, _, kvs = part.partition(":")
        values = dict(base)
        for kv in filter(None, (x.strip() for x in kvs.split(","))):
            key, _, value = kv.partition("=")
            if key not in SETTING_KEYS:
                raise ValueError(f"--settings: {key!r} in {part!r}; keys are {sorted(SETTING_KEYS)}")
            values[key] = SETTING_KEYS[key](value)
        out.append((name.strip(), pipeline_lib.Settings(**values)))
    return out


# ---------------------------------------------------------------------------------------------------------- train


def latest_step(workdir: str) -> int:
    ckpt = checkpoint_lib.Checkpointer(workdir, async_save=False)
    try:
        return int(ckpt.latest_step() or 0)
    finally:
        ckpt.close()


def train(workdir: str, steps: int, overrides: list[str], config: str) -> float | None:
    """Train `workdir` to `steps` (a fresh run from `config`, or a resume); returns the wall seconds, None if the
    workdir already had them."""
    if os.path.isdir(workdir) and latest_step(workdir) >= steps:
        return None
    cmd = [sys.executable, "-m", "ttm_jax.main", f"--workdir={workdir}", f"--config.train.total_steps={steps}"]
    if not os.path.isdir(os.path.join(workdir, "checkpoints")):
        cmd.insert(3, f"--config={config}")
    cmd += [f"--config.{o}" for o in overrides]
    print("train:", " ".join(cmd), flush=True)
    t0 = time.time()
    subprocess.run(cmd, check=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return time.time() - t0


# --------------------------------------------------------------------------------------------------------- scenes


def training_scenes(config, workdir: str, num: int) -> dict[str, np.ndarray]:
    """The first `num` clips of the run's training data (training order), as one batch."""
    it = loader.make_train_iterator(config, process_index=0, process_count=1, workdir=workdir)
    rows: list[dict[str, np.ndarray]] = []
    while sum(len(r["num_objects"]) for r in rows) < num:
        rows.append(next(it))
    batch = {k: np.concatenate([r[k] for r in rows])[:num] for k in rows[0]}
    return {k: v for k, v in batch.items() if k in inputs_lib.BATCH_KEYS}


def mean_speed_oracle(config, bench_dir: str, num: int) -> dict[str, float]:
    """What a stage 1 that gets every object's motion right except its speed would score: each held-out object
    re-rendered moving in its true direction (with its true scale change and spin) at the generator's mean speed
    (`synthetic.TRAVEL_FRACTION`: the travel is drawn as a share of the free room; the prompts do not say it), its
    per-object IoU with the ground-truth masks over the clip; also without the scale change and spin. `carried`:
    the true path drawn with the first frame's mask moved by whole pixels (`judge.carried_first_frame`): a model that
    copies the shape it is given exactly, along the right path, without the sub-pixel re-rasterisation of each frame
    (which the rasterised first frame does not fully determine)."""
    bench = heldout_benchmark(config, bench_dir, num)
    mean_fraction = sum(synthetic.TRAVEL_FRACTION) / 2

    def at_mean_speed(o, spec, plain):
        if not o.speed:  # a speed the prompt names (ladder rung 1) is known: only unnamed speeds take the mean
            o = dataclasses.replace(o, displacement=synthetic.displacement(o.direction, o.radius, o.scale_change,
                                                                           mean_fraction, spec.height, spec.width))
        return dataclasses.replace(o, scale_change="none", spin=0.0) if plain else o

    out: dict[str, list[float]] = {"oracle": [], "oracle_translation_only": [], "carried": []}
    for scene in bench.scenes[:num]:
        gt, spec = scene.masks(), scene.spec()
        out["carried"] += [judge.trajectory_iou(judge.carried_first_frame(gt[..., j]), gt[..., j])
                           for j in range(gt.shape[-1])]
        for name, plain in (("oracle", False), ("oracle_translation_only", True)):
            objs = tuple(at_mean_speed(o, spec, plain) for o in spec.objects)
            found = bench.render(scene, dataclasses.replace(spec, objects=objs))[1]
            out[name] += [judge.trajectory_iou(found[..., j], gt[..., j]) for j in range(gt.shape[-1])]
    return {k: float(np.mean(v)) for k, v in out.items()}


def heldout_benchmark(config, bench_dir: str, num: int) -> motion_bench.Benchmark:
    """The held-out benchmark of `num` scenes at the run's clip geometry (one folder per geometry; made if absent)."""
    d = config.data
    rung = int(d.get("synthetic_rung", synthetic.FULL_RUNG))
    name = f"{bench_dir}_{d.height}x{d.width}x{d.num_frames}@{d.fps:g}" + (
        f"_rung{rung}" if rung != synthetic.FULL_RUNG else "")
    return motion_bench.make_benchmark(name, num, height=int(d.height), width=int(d.width), frames=int(d.num_frames),
                                       fps=float(d.fps), rung=rung)


def heldout_scenes(config, bench_dir: str, num: int) -> tuple[dict[str, np.ndarray], list]:
    """`num` held-out benchmark scenes at the run's clip geometry, as one training-format batch."""
    d = config.data
    bench = heldout_benchmark(config, bench_dir, num)
    tok = tokenizer_lib.make_tokenizer(config.text_encoder)
    kmax = int(d.max_objects)
    rows = []
    for scene in bench.scenes[:num]:
        video, masks = scene.video(), scene.masks()
        k = masks.shape[-1]
        om = np.concatenate([masks, np.zeros(masks.shape[:-1] + (kmax - k,), bool)], -1)
        row = {"video": video, "trajectory": trajectory_lib.render(masks), "object_masks": om,
               "num_objects": np.int32(k)}
        row.update(tokenize_prompts(config, tok, scene.caption, scene.entry["motion_prompt"], scene.local_prompts))
        rows.append(row)
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}, bench.scenes[:num]


# -------------------------------------------------------------------------------------------------------- metrics


def restart(runner: pipeline_lib.StageRunner, target: np.ndarray, eps: np.ndarray, level: float, steps: int,
            conds) -> tuple[jax.Array, float]:
    """The ground truth noised to noise level `level` (`objective.time_at`), then about `steps` unguided sampler steps
    to the end; returns the latent and the level it started from. Rectified flow: uniform Euler from `level` to 0.
    ddim_v: the tail of the DDIM grid (`objective.timestep_spacing`) of `steps / level` steps (at most T) from its
    first timestep at or below the level's, so it may start a little below `level` (its strides, and so its alphas,
    are the full grid's)."""
    if not 0.0 < level <= 1.0 or steps < 1:
        raise ValueError(f"stage1_probe: --restart_times {level} must be in (0, 1] and --restart_steps {steps} >= 1")
    objective, params = runner.objective, runner.stage.params
    scales = jnp.asarray([1.0, 1.0], jnp.float32)
    if isinstance(objective, objectives.DDIMVPrediction):
        n = min(max(steps, int(round(steps / level))), objective.num_train_timesteps)
        full = objective.time_grid(n)
        a_t, a_prev = ddim.step_alphas(full, objective.alphas_cumprod, objective.num_train_timesteps)
        below = full <= objective.time_at(level)
        k = int(np.argmax(below)) if below.any() else len(full) - 1
        t0 = jnp.full((target.shape[0],), full[k], jnp.float32)
        xt = objective.noisy(jnp.asarray(target), jnp.asarray(eps), t0)
        latent = jax.jit(lambda x, ts, a, ap, p, c: ddim.ddim_sample(
            runner.velocity, x, ts, a, ap, p, c, scales, self_condition=runner.self_condition))(
            runner.place(xt), jnp.asarray(full[k:]), a_t[k:], a_prev[k:], params, conds)
        return latent, float(full[k]) / (objective.num_train_timesteps - 1)
    t0 = jnp.full((target.shape[0],), objective.time_at(level), jnp.float32)
    xt = objective.noisy(jnp.asarray(target), jnp.asarray(eps), t0)
    ts = np.linspace(objective.time_at(level), 0.0, steps + 1).astype(np.float32)
    return runner._sample(runner.place(xt), jnp.asarray(ts), params, conds, scales), float(level)


def latent_mse(a: np.ndarray, b: np.ndarray) -> float:
    """MSE over latent frames 1+ of `[B, T', H', W', C]` arrays."""
    return float(np.mean((np.asarray(a[:, 1:], np.float64) - np.asarray(b[:, 1:], np.float64)) ** 2))


def object_ious(ids: np.ndarray, batch: dict[str, np.ndarray]) -> dict[str, list[float]]:
    """Per object of every clip: IoU over the clip (frame 0 anchored), over frames 1+, and whether it moves.
    ids int `[B, T, H, W]`."""
    out: dict[str, list[float]] = {"iou": [], "iou1": [], "moves": []}
    for i in range(ids.shape[0]):
        k = int(batch["num_objects"][i])
        gt = batch["object_masks"][i][..., :k].astype(bool)
        clip = ids[i].copy()
        clip[0] = trajectory_lib.ids_from_masks(gt[0])
        found = trajectory_lib.masks_from_ids(clip, k)
        traj = trajectory_lib.render_ids(clip)
        per = judge.score_trajectory(traj, gt)  # the judge's own reading of the trajectory
        for j in range(k):
            out["iou"].append(float(per[j]))
            out["iou1"].append(judge.trajectory_iou(found[1:, ..., j], gt[1:, ..., j]))
            out["moves"].append(float(judge.mask_iou(gt[:1, ..., j].repeat(gt.shape[0] - 1, 0),
                                                     gt[1:, ..., j]).mean() < 0.999))
    return out


def direction_agreement(decoded: np.ndarray, batch: dict[str, np.ndarray], min_travel: float = 2.0) -> dict[str, float]:
    """Does a (blurred) prediction move each object the right way? Per object that travels at least `min_travel`
    pixels in the ground truth: the cosine between the true displacement of its mask's centroid (frame 0 -> last) and
    that of its palette colour's soft mass in `decoded` (float video `[B, T, H, W, 3]` in [-1, 1]; weight
    `exp(-|rgb - colour|^2 / 0.05)` in [0, 1] RGB). Returns the mean cosine, the share above 0.5 (within 60 degrees)
    and the number of objects."""
    video = (np.asarray(decoded, np.float64) + 1.0) / 2.0
    ys, xs = np.mgrid[:video.shape[2], :video.shape[3]]

    def centroid(w):
        total = w.sum() + 1e-9
        return np.array([(w * ys).sum() / total, (w * xs).sum() / total])

    cos = []
    for i in range(video.shape[0]):
        gt = batch["object_masks"][i].astype(np.float64)
        for j in range(int(batch["num_objects"][i])):
            truth = centroid(gt[-1, ..., j]) - centroid(gt[0, ..., j])
            if np.linalg.norm(truth) < min_travel:
                continue
            colour = trajectory_lib.PALETTE[j + 1].astype(np.float64) / 255.0
            w0, w1 = (np.exp(-((video[i, f] - colour) ** 2).sum(-1) / 0.05) for f in (0, -1))
            moved = centroid(w1) - centroid(w0)
            cos.append(float(moved @ truth / (np.linalg.norm(moved) * np.linalg.norm(truth) + 1e-9)))
    c = np.asarray(cos)
    return {"cos": float(c.mean()) if c.size else float("nan"), "within60": float((c > 0.5).mean()) if c.size
            else float("nan"), "travelling": int(c.size)}


def summarise(ious: dict[str, list[float]]) -> dict[str, float]:
    iou, iou1, moves = (np.asarray(ious[k]) for k in ("iou", "iou1", "moves"))
    mov = iou1[moves > 0]
    return {"iou": float(iou.mean()), "iou1": float(iou1.mean()),
            "mov": float(mov.mean()) if mov.size else float("nan"), "objects": int(iou.size), "moving": int(mov.size)}


def strip(batch: dict[str, np.ndarray], decoded: np.ndarray, rows: int, scale: int = 4) -> np.ndarray:
    """uint8 image: per scene `first frame | GT trajectory | sampled trajectory`, separated by grey bars."""
    lines = []
    for i in range(min(rows, decoded.shape[0])):
        t = batch["trajectory"].shape[1]
        bar = np.full((batch["video"].shape[2], 2, 3), 128, np.uint8)
        parts = [batch["video"][i, 0], bar]
        parts += [x for f in range(t) for x in (batch["trajectory"][i, f], bar[:, :1])]
        parts += [bar]
        parts += [x for f in range(t) for x in (decoded[i, f], bar[:, :1])]
        line = np.concatenate(parts, axis=1)
        lines += [line, np.full((2, line.shape[1], 3), 128, np.uint8)]
    img = np.concatenate(lines, axis=0)
    return img.repeat(scale, 0).repeat(scale, 1)


def model_size(config) -> str:
    """The backbone's width and depth in words (DiT: dim x layers; U-Net: its block channels)."""
    m = config.model
    if "dim" in m:
        return f"DiT dim {m.dim} x {m.num_layers} layers"
    return f"U-Net block_out_channels {tuple(m.unet.block_out_channels)}"


def main(argv) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)
    workdir = _WORKDIR.value
    wall = None
    if _STEPS.value:
        wall = train(workdir, _STEPS.value, _OVERRIDES.value, _CONFIG.value)
    stage = load_stage(workdir, 1, field="--workdir")
    config = stage.config
    runner = pipeline_lib.StageRunner(stage)
    ae = stage.modules.autoencoder
    model = inputs_lib.model_fn(config, stage.modules)
    png_dir = _PNG_DIR.value or os.path.join(workdir, "probe")
    os.makedirs(png_dir, exist_ok=True)
    settings = parse_settings(_SETTINGS.value, config.sample)
    print(f"workdir {workdir}: step {stage.step}" + (f", trained in {wall:.0f} s" if wall else "") +
          f"; objective shift {config.objective.shift} t_sampling {config.objective.t_sampling}; "
          f"synthetic_num_videos {config.data.synthetic_num_videos}; model {model_size(config)}", flush=True)

    splits = {}
    if _NUM_TRAIN.value:
        splits["train"] = training_scenes(config, workdir, _NUM_TRAIN.value)
    if _NUM_HELDOUT.value:
        splits["heldout"], _ = heldout_scenes(config, _BENCH_DIR.value, _NUM_HELDOUT.value)

    objective = runner.objective
    # one step from x alone (with self-conditioning: a zero estimate, as the sampler's first step)
    one_step_in = (lambda x: jnp.concatenate([x, jnp.zeros_like(x)], -1)) if runner.self_condition else (lambda x: x)
    x0_fn = jax.jit(lambda x, t, params, conds: objective.clean_estimate(x, model(one_step_in(x), t, params, conds),
                                                                         t))
    results: dict = {"workdir": workdir, "step": stage.step, "train_wall_s": wall,
                     "config": {"objective.shift": config.objective.shift,
                                "objective.t_sampling": config.objective.t_sampling,
                                "data.synthetic_num_videos": config.data.synthetic_num_videos,
                                "model": model_size(config)},
                     "splits": {}}
    rows = []
    for split, batch in splits.items():
        b = batch["num_objects"].shape[0]
        target = np.asarray(ae.encode(inputs_lib.to_unit_range(jnp.asarray(batch["trajectory"]))))
        repeat = np.repeat(target[:, :1], target.shape[1], axis=1)
        rep_mse = latent_mse(repeat, target)
        rep_ids = np.repeat(trajectory_lib.ids_from_masks(batch["object_masks"][:, :1].astype(bool)),
                            batch["trajectory"].shape[1], axis=1)
        rep = summarise(object_ious(rep_ids, batch))
        conds = runner.conditions(batch)
        # the same scenes with every prompt rolled by one (each scene gets another scene's text)
        other = runner.conditions({k: np.roll(v, 1, axis=0) if k.endswith(("_tokens", "_mask")) and "local" not in k
                                   or k.startswith("local_") else v for k, v in batch.items()})
        res: dict = {"repeat": {"mse1": rep_mse, **rep}, "x0": {}, "text_use": {}, "settings": {},
                     "background_mse1": latent_mse(np.full_like(target, target.min()), target),
                     # the direction probe's reference: the ground truth itself, through the autoencoder
                     "direction_truth": direction_agreement(runner.decode(target), batch)}
        if split == "heldout":
            res["oracle"] = mean_speed_oracle(config, _BENCH_DIR.value, _NUM_HELDOUT.value)
            print(f"held-out bar (rung {config.data.get('synthetic_rung', synthetic.FULL_RUNG)}): right motion at "
                  f"the mean speed (the prompt's, where it names one) scores iou {res['oracle']['oracle']:.3f} "
                  f"(translation only {res['oracle']['oracle_translation_only']:.3f}; the true path with frame "
                  f"0's mask moved by whole pixels {res['oracle']['carried']:.3f}); repeating frame 0 "
                  f"{rep['iou']:.3f}", flush=True)
        # what the denoiser knows at each noise level (conditional, one step)
        eps = np.asarray(jax.random.normal(jax.random.PRNGKey(1), target.shape, jnp.float32))
        for tv in (float(x) for x in _X0_TIMES.value):
            t = jnp.full((b,), objective.time_at(tv), jnp.float32)
            xt = np.asarray(objective.noisy(jnp.asarray(target), jnp.asarray(eps), t))
            with runner._ctx():
                x0 = np.asarray(x0_fn(jnp.asarray(xt), t, stage.params, conds.full))
            decoded_x0 = runner.decode(x0)
            ids = np.stack([trajectory_lib.ids_from_trajectory(d, int(batch["num_objects"][i]))
                            for i, d in enumerate(decoded_x0)])
            res["x0"][tv] = {"mse1": latent_mse(x0, target), **summarise(object_ious(ids, batch)),
                             "direction": direction_agreement(decoded_x0, batch)}
            # does the prediction use the text? its prompt vs another scene's vs the null prompt
            with runner._ctx():
                res["text_use"][tv] = {name: latent_mse(np.asarray(x0_fn(jnp.asarray(xt), t, stage.params, c)), target)
                                       for name, c in (("own", conds.full), ("other", other.full),
                                                       ("null", conds.image))}
        # restarts: the ground truth noised to a level, then sampled (no guidance) to the end: where sampling goes wrong
        res["restart"] = {}
        for ts0 in (float(x) for x in _RESTART_TIMES.value):
            with runner._ctx():
                latent, start = restart(runner, target, eps, ts0, _RESTART_STEPS.value, conds)
                latent = np.asarray(latent)
            decoded = runner.decode(latent)
            ids = np.stack([trajectory_lib.ids_from_trajectory(decoded[i], int(batch["num_objects"][i]))
                            for i in range(b)])
            res["restart"][ts0] = {"mse1": latent_mse(latent, target), "start": start,
                                   **summarise(object_ious(ids, batch))}
        for name, s in settings:
            t0 = time.time()
            latent = np.asarray(runner.sample(conds, list(range(b)), s))
            decoded = runner.decode(latent)
            sec = time.time() - t0
            ids = np.stack([trajectory_lib.ids_from_trajectory(decoded[i], int(batch["num_objects"][i]))
                            for i in range(b)])
            m = {"mse1": latent_mse(latent, target), **summarise(object_ious(ids, batch)), "sample_s": sec,
                 "settings": dataclasses.asdict(s)}
            res["settings"][name] = m
            png = os.path.join(png_dir, f"{split}_{name}.png")
            Image.fromarray(strip(batch, pipeline_lib.to_uint8(decoded), _PNG_ROWS.value)).save(png)
            rows.append((split, name, s, m, res["repeat"]))
        results["splits"][split] = res

    print()
    print(f"{'split':8s} {'setting':16s} {'grid':22s} {'guid':8s} {'mse1+':>7s} {'rep':>6s} {'iou':>6s} {'rep':>6s} "
          f"{'iou1+':>6s} {'rep':>6s} {'mov':>6s} {'rep':>6s} {'obj':>4s}")
    for split, name, s, m, r in rows:
        grid = f"{s.schedule[:6]} {s.num_steps} sh{s.shift:g}"
        print(f"{split:8s} {name:16s} {grid:22s} {s.image_scale:g}/{s.text_scale:<4g} {m['mse1']:7.4f} "
              f"{r['mse1']:6.4f} {m['iou']:6.3f} {r['iou']:6.3f} {m['iou1']:6.3f} {r['iou1']:6.3f} {m['mov']:6.3f} "
              f"{r['mov']:6.3f} {m['objects']:4d}")
    for split, res in results["splits"].items():
        print(f"x0 MSE ({split}, latent frames 1+, one step): " +
              "  ".join(f"t={t:g}: mse1+ {v['mse1']:.4f} iou1+ {v['iou1']:.3f} direction cos "
                        f"{v['direction']['cos']:.2f} ({v['direction']['within60']:.0%} of "
                        f"{v['direction']['travelling']} within 60 deg)" for t, v in res["x0"].items())
              + f"  (repeat: {res['repeat']['mse1']:.4f}, all background: {res['background_mse1']:.4f}; direction cos "
              f"of the truth {res['direction_truth']['cos']:.2f})")
        print(f"text use ({split}, x0 mse1+ with its own prompt / another scene's / the null prompt): " +
              "  ".join(f"t={t:g}: {v['own']:.4f} / {v['other']:.4f} / {v['null']:.4f}"
                        for t, v in res["text_use"].items()))
    for split, res in results["splits"].items():
        print(f"restart ({split}: GT noised to level t, ~{_RESTART_STEPS.value} sampler steps, no guidance): " +
              "  ".join(f"t={t:g} (from {v['start']:.3f}): mse1+ {v['mse1']:.4f} iou1+ {v['iou1']:.3f}"
                        for t, v in res["restart"].items()))
    with open(os.path.join(png_dir, "probe.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)
    print(f"strips and probe.json in {png_dir}")


if __name__ == "__main__":
    app.run(main)
