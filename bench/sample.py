"""Seconds per video of two-stage generation, stage 1 and stage 2 apart, batched vs three-call guidance.

    python bench/sample.py [--variants=tiny,mid] [--num_steps=0] [--batch=1] [--repeats=2]

For each variant and stage: the real DiT, text encoder and autoencoder of that config with randomly initialised
weights (timing does not depend on training), conditions from a synthetic SA-V first frame, then the full guided
Euler loop (`config.sample.num_steps` steps unless `--num_steps`), jitted, timed after one compile-and-run warm-up
(best of `--repeats`), decode included. Guidance is timed both as one forward pass over the tripled batch (what the
pipeline runs) and as three separate passes (the reference); the table gives the ratio measured in the same run.
"""

from __future__ import annotations

import time

import jax
import numpy as np
from absl import app, flags

from ttm_jax import config as config_lib
from ttm_jax.assembly import frozen as frozen_lib
from ttm_jax.assembly import modules as modules_lib
from ttm_jax.assembly import params as params_lib
from ttm_jax.assembly import trained as trained_lib
from ttm_jax.data import synthetic, trajectory
from ttm_jax.inference import pipeline as pipeline_lib
from ttm_jax.inference import prompts
from ttm_jax.inference import requests as requests_lib

_VARIANTS = flags.DEFINE_list("variants", ["tiny", "mid"], "Config variants to time.")
_STEPS = flags.DEFINE_integer("num_steps", 0, "Sampling steps; 0: each config's sample.num_steps.")
_BATCH = flags.DEFINE_integer("batch", 1, "Videos per batch.")
_REPEATS = flags.DEFINE_integer("repeats", 2, "Timed runs after the warm-up; the best is reported.")


def random_stage(config) -> trained_lib.Stage:
    from ttm_jax.runtime import mesh as mesh_lib
    from ttm_jax.runtime import sharding as sharding_lib

    mesh = mesh_lib.make_mesh(config.mesh)
    rules = sharding_lib.rules_from_config(config.mesh)
    modules = modules_lib.build_modules(config)
    init = params_lib.make_init_params(config, modules)
    params, _ = sharding_lib.init_sharded(init, jax.random.PRNGKey(0), mesh=mesh, rules=rules)
    frozen, _ = frozen_lib.init_frozen(config, modules, mesh, rules)
    return trained_lib.Stage(config, modules, params, frozen, mesh, rules, 0, "<random init>")


def prepared(config, batch: int) -> list[pipeline_lib.Prepared]:
    d = config.data
    v = synthetic.make_video(0, 1, height=d.height, width=d.width, frames=d.num_frames)
    masks = v.masks[0][..., : d.max_objects]
    plan = prompts.plan_offline(v.caption_entry["caption"])
    match = prompts.match_prompts_to_masks(plan, masks.shape[-1])
    req = requests_lib.Request(image=v.frames[0], caption=plan.caption, masks=masks)
    return [pipeline_lib.Prepared(req, v.frames[0], masks, [None] * masks.shape[-1], "synthetic", plan, match,
                                  match.local_prompts(plan))] * batch


def time_stage(stage: trained_lib.Stage, items, settings, mode: str) -> float:
    runner = pipeline_lib.StageRunner(stage, guidance_mode=mode)
    pipe = object.__new__(pipeline_lib.Pipeline)  # only `_batch` is used, which needs the frame count
    pipe.num_frames = int(stage.config.data.num_frames)
    ids = None
    if stage.stage == 2:
        ids = np.stack([np.broadcast_to(trajectory.ids_from_masks(p.masks), (pipe.num_frames, *p.masks.shape[:2]))
                        for p in items])
    seeds = list(range(len(items)))

    def once():
        conds = runner.conditions(pipe._batch(stage, items, ids))
        return runner.decode(runner.sample(conds, seeds, settings))

    once()  # compile
    best = float("inf")
    for _ in range(_REPEATS.value):
        t0 = time.perf_counter()
        jax.block_until_ready(once())
        best = min(best, time.perf_counter() - t0)
    return best / len(items)


def main(argv):
    del argv
    print(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind}; batch {_BATCH.value}")
    rows = []
    for variant in _VARIANTS.value:
        for stage_num in (1, 2):
            config = config_lib.build(stage_num, variant)
            steps = _STEPS.value or int(config.sample.num_steps)
            settings = pipeline_lib.Settings(num_steps=steps, schedule=config.sample.schedule)
            stage = random_stage(config)
            items = prepared(config, _BATCH.value)
            batched = time_stage(stage, items, settings, "batched")
            three = time_stage(stage, items, settings, "three_calls")
            rows.append((variant, stage_num, steps, batched, three))
            print(f"  {variant} stage {stage_num}: batched {batched:.3f} s/video, three calls {three:.3f} s/video",
                  flush=True)
    print()
    print(f"{'variant':<8} {'stage':>5} {'steps':>5} {'batched s/video':>16} {'3-call s/video':>15} "
          f"{'3-call / batched':>17}")
    for variant, s, steps, b, t in rows:
        print(f"{variant:<8} {s:>5} {steps:>5} {b:>16.3f} {t:>15.3f} {t / b:>17.2f}")
    for variant in _VARIANTS.value:
        total = sum(b for v, _, _, b, _ in rows if v == variant)
        print(f"{variant}: two-stage video (batched guidance) {total:.3f} s")


if __name__ == "__main__":
    app.run(main)
