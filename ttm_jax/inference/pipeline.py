"""Two-stage TTM generation: image + caption (+ first-frame masks or boxes) -> trajectory -> video.

    request (image, caption, masks | boxes)
      -> prompt planning        motion prompt + local prompts (LLM at sample.llm_url, else the offline planner),
                                local prompts matched to the first-frame masks (by label, colour or order; reported)
      -> stage 1                E(x0), E(s0) + motion prompt -> Euler + two-scale guidance -> trajectory latent
      -> decode                 palette colours -> object ids per pixel (frame 0 anchored to the given masks)
                                -> per-object masks -> the clean palette trajectory, token ids for the masked layers
      -> stage 2                E(x0), E(trajectory) + caption + local prompts -> Euler + guidance -> video latent
      -> decode                 `<name>.mp4`, `<name>_side_by_side.mp4` (input | trajectory | video),
                                `<name>.json` (prompts, matching, settings, checkpoints)

Requests, images and first-frame masks are read by `requests.py`. The stages are loaded from their workdirs by
`ttm_jax.assembly.trained.load_stage` (the config saved beside the latest checkpoint, the frozen text encoder
initialised exactly as training did), and the conditions are made by the very functions training uses
(`ttm_jax.assembly.inputs.prepare`, `drop_text_conditions`, `model_fn`): what the model sees at sampling is what it
saw in training, condition dropout included ("null" image = zeros, "null" text = the empty prompt, for the caption
and every local-prompt slot).

Requests are processed `sample.batch_size` at a time (the last batch padded by repetition, so one compiled function
serves every batch); each request's noise is drawn from its own seed (`fold_in(PRNGKey(seed), stage)`), so a video
depends on its request alone, not on its batch neighbours. With several devices the batch is split over the mesh's
data/fsdp axes when it divides, the parameters keep their training sharding.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ttm_jax import config as config_lib
from ttm_jax.assembly import inputs as inputs_lib
from ttm_jax.assembly import objectives
from ttm_jax.assembly.trained import Stage, load_stage
from ttm_jax.data import trajectory as trajectory_lib
from ttm_jax.data import video_io
from ttm_jax.diffusion import guidance, samplers
from ttm_jax.inference import prompts as prompts_lib
from ttm_jax.inference.requests import Request, load_image, load_masks, tokenize_prompts
from ttm_jax.models import tokenizer as tokenizer_lib
from ttm_jax.runtime import mesh as mesh_lib


@dataclasses.dataclass(frozen=True)
class Settings:
    """Sampling settings (config.sample)."""

    num_steps: int = 20
    schedule: str = "linear_quadratic"
    shift: float = 1.0
    image_scale: float = 1.5
    text_scale: float = 3.0


def _check_geometry(s1: ml_collections.ConfigDict, s2: ml_collections.ConfigDict) -> None:
    for key in ("num_frames", "height", "width"):
        if s1.data[key] != s2.data[key]:
            raise ValueError(f"pipeline: stage 1 was trained with data.{key}={s1.data[key]}, stage 2 with "
                             f"{s2.data[key]}; the trajectory of one must fit the other: train them with the same "
                             f"data.num_frames/height/width")


class StageRunner:
    """Jitted condition building and guided Euler sampling of one stage."""

    def __init__(self, stage: Stage, *, guidance_mode: str = "batched"):
        """`guidance_mode`: `batched` (one forward pass over 3B, the default) or `three_calls` (the reference, for
        bench/sample.py)."""
        if guidance_mode not in ("batched", "three_calls"):
            raise ValueError(f"pipeline.StageRunner: guidance_mode={guidance_mode!r}; choose batched or three_calls")
        self.stage = stage
        config, modules = stage.config, stage.modules
        self.latent_shape = config_lib.latent_shape(config)
        self.objective = objectives.make_objective(config.objective)
        model = inputs_lib.model_fn(config, modules)

        def conditions(frozen, batch):
            _, first, cond, text = inputs_lib.prepare(config, modules, frozen, batch)
            b = first.shape[0]
            full = inputs_lib.drop_text_conditions(config, modules, frozen, text, jnp.zeros((b,), bool))
            null = inputs_lib.drop_text_conditions(config, modules, frozen, text, jnp.ones((b,), bool))
            zeros = dict(first=jnp.zeros_like(first), cond=jnp.zeros_like(cond))
            return guidance.GuidanceConds(none={**zeros, **null}, image={"first": first, "cond": cond, **null},
                                          full={"first": first, "cond": cond, **full})

        def velocity(x, t, params, conds, scales):
            guide = guidance.guided if guidance_mode == "batched" else guidance.guided_three_calls
            return guide(lambda x3, t3, c: model(x3, t3, params, c), x, t, conds, scales[0], scales[1])

        def decode(latent):
            return jnp.clip(modules.autoencoder.decode(latent), -1.0, 1.0)

        self._conditions = jax.jit(conditions)
        self._sample = jax.jit(lambda noise, ts, params, conds, scales: self.objective.sample(
            velocity, noise, ts, params, conds, scales))
        self._decode = jax.jit(decode)
        self.velocity = velocity

    def _ctx(self):
        s = self.stage
        return _Contexts(jax.set_mesh(s.mesh), nn.logical_axis_rules(s.rules))

    def place(self, tree: Any) -> Any:
        """Batch-leading arrays onto the stage's mesh: split over data/fsdp when the batch divides, else replicated."""
        mesh = self.stage.mesh
        b = jax.tree.leaves(tree)[0].shape[0]
        if b % mesh_lib.batch_parallelism(mesh) == 0:
            return samplers.shard_batch(tree, mesh)
        return jax.device_put(tree, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))

    def time_grid(self, settings: Settings) -> np.ndarray:
        """The objective's sampling times for `settings` (`[num_steps + 1]`, descending)."""
        return self.objective.time_grid(int(settings.num_steps), settings.schedule, float(settings.shift))

    def conditions(self, batch: dict[str, np.ndarray]) -> guidance.GuidanceConds:
        with self._ctx():
            return self._conditions(self.stage.frozen, self.place(batch))

    def noise(self, seeds: Sequence[int]) -> jax.Array:
        """`[B, T', H', W', C]`, row i from `fold_in(PRNGKey(seeds[i]), stage)` alone."""
        keys = [jax.random.fold_in(jax.random.PRNGKey(int(s)), self.stage.stage) for s in seeds]
        return jnp.stack([jax.random.normal(k, self.latent_shape, jnp.float32) for k in keys])

    def sample(self, conds: guidance.GuidanceConds, seeds: Sequence[int], settings: Settings) -> jax.Array:
        """Latents `[B, T', H', W', C]`."""
        scales = jnp.asarray([settings.image_scale, settings.text_scale], jnp.float32)
        with self._ctx():
            return self._sample(self.place(self.noise(seeds)), jnp.asarray(self.time_grid(settings)), self.stage.params,
                                conds, scales)

    def decode(self, latent: jax.Array) -> np.ndarray:
        """Float video `[B, T, H, W, 3]` in [-1, 1] (numpy)."""
        with self._ctx():
            return np.asarray(jax.device_get(self._decode(latent)))


class _Contexts:
    def __init__(self, *cms):
        self.cms = cms

    def __enter__(self):
        for c in self.cms:
            c.__enter__()

    def __exit__(self, *exc):
        for c in reversed(self.cms):
            c.__exit__(*exc)


def to_uint8(video: np.ndarray) -> np.ndarray:
    return np.clip(np.round((np.asarray(video, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


@dataclasses.dataclass
class Prepared:
    """A request after planning and mask loading, at the stages' resolution."""

    request: Request
    image: np.ndarray  # uint8 [H, W, 3]
    masks: np.ndarray  # bool [H, W, K] first-frame masks, in object-id order
    labels: list[str | None]
    mask_source: str
    plan: prompts_lib.Plan
    match: prompts_lib.Match
    local_prompts: list[str]  # in object-id order (mask order)


class Pipeline:
    """Both stages and the planner; `generate(requests, out_dir)` writes the videos."""

    def __init__(self, stage1: Stage, stage2: Stage, settings: Settings = Settings(), *, llm_client: Any = None,
                 match: str = "auto", anchor_first_frame: bool = True, batch_size: int = 1):
        _check_geometry(stage1.config, stage2.config)
        self.s1, self.s2 = StageRunner(stage1), StageRunner(stage2)
        self.settings, self.llm, self.match = settings, llm_client, match
        self.anchor_first_frame, self.batch_size = anchor_first_frame, max(1, int(batch_size))
        d = stage2.config.data
        self.num_frames, self.height, self.width = int(d.num_frames), int(d.height), int(d.width)
        self.fps = float(d.fps)

    @classmethod
    def from_workdirs(cls, stage1_workdir: str, stage2_workdir: str, settings: Settings = Settings(),
                      *, ema: bool = True, **kw) -> Pipeline:
        return cls(load_stage(stage1_workdir, 1, ema=ema), load_stage(stage2_workdir, 2, ema=ema), settings, **kw)

    # ---- planning
    def prepare(self, req: Request) -> Prepared:
        image, size = load_image(req.image, self.height, self.width)
        masks, labels, source = load_masks(req, size, self.height, self.width)
        k = masks.shape[-1]
        if req.local_prompts is not None:
            if len(req.local_prompts) != k:
                raise ValueError(f"pipeline: request {req.name!r} gives {len(req.local_prompts)} local prompts for "
                                 f"{k} masks; give one per mask, in mask order")
            motion = req.motion_prompt
            if not motion:
                try:
                    motion = prompts_lib.plan_offline(req.caption).motion_prompt
                except prompts_lib.PlanningError:
                    motion = req.caption  # no clause structure to strip: the caption itself carries the motion
            plan = prompts_lib.Plan(req.caption, motion, list(req.local_prompts),
                                    [prompts_lib.object_phrase(p) for p in req.local_prompts], "given")
            match = prompts_lib.Match(list(range(k)), "given")
        else:
            if self.llm is not None:
                names = labels if all(labels) else None
                plan = prompts_lib.plan_with_llm(req.caption, self.llm.complete, num_objects=k, object_names=names)
            else:
                plan = prompts_lib.plan_offline(req.caption)
            if req.motion_prompt:
                plan.motion_prompt = req.motion_prompt
            match = prompts_lib.match_prompts_to_masks(plan, k, labels=labels, image=image, masks=masks,
                                                       rule=self.match)
        return Prepared(req, image, masks, labels, source, plan, match, match.local_prompts(plan))

    # ---- batches for the stages
    def _batch(self, stage: Stage, items: Sequence[Prepared], trajectories: np.ndarray | None) -> dict:
        """Training-format batch: `video` = the image held still (only its first frame is used: causal encoder),
        `trajectory` = s0 held still (stage 1) or the generated trajectory (stage 2), `object_masks` from it."""
        t, kmax = self.num_frames, int(stage.config.data.max_objects)
        tok = tokenizer_lib.make_tokenizer(stage.config.text_encoder)
        rows = []
        for i, p in enumerate(items):
            video = np.broadcast_to(p.image, (t, *p.image.shape))
            if trajectories is None:
                traj = np.broadcast_to(trajectory_lib.render(p.masks[None]), (t, *p.image.shape))
                om = np.broadcast_to(p.masks[None], (t, *p.masks.shape))
            else:
                ids = trajectories[i]
                traj = trajectory_lib.render_ids(ids)
                om = trajectory_lib.masks_from_ids(ids, p.masks.shape[-1])
            om = np.concatenate([om, np.zeros(om.shape[:-1] + (kmax - om.shape[-1],), bool)], -1)
            row = {"video": video, "trajectory": traj, "object_masks": om,
                   "num_objects": np.int32(p.masks.shape[-1])}
            row.update(tokenize_prompts(stage.config, tok, p.plan.caption, p.plan.motion_prompt, p.local_prompts))
            rows.append(row)
        return {k: np.stack([r[k] for r in rows]) for k in rows[0]}

    def trajectory_ids(self, items: Sequence[Prepared], decoded: np.ndarray) -> np.ndarray:
        """Decoded stage-1 videos `[B, T, H, W, 3]` in [-1, 1] -> object ids `[B, T, H, W]` (nearest palette colour
        among each request's K objects; frame 0 set to the given masks when `anchor_first_frame`)."""
        out = []
        for p, v in zip(items, decoded, strict=True):
            ids = trajectory_lib.ids_from_trajectory(v, p.masks.shape[-1])
            if self.anchor_first_frame:
                ids[0] = trajectory_lib.ids_from_masks(p.masks)
            out.append(ids)
        return np.stack(out)

    def run_stage1(self, items: Sequence[Prepared]) -> tuple[np.ndarray, np.ndarray]:
        """(object ids `[B, T, H, W]`, raw decoded trajectories uint8 `[B, T, H, W, 3]`)."""
        conds = self.s1.conditions(self._batch(self.s1.stage, items, None))
        decoded = self.s1.decode(self.s1.sample(conds, [p.request.seed for p in items], self.settings))
        return self.trajectory_ids(items, decoded), to_uint8(decoded)

    def stage2_conditions(self, items: Sequence[Prepared], ids: np.ndarray) -> guidance.GuidanceConds:
        return self.s2.conditions(self._batch(self.s2.stage, items, ids))

    def run_stage2(self, items: Sequence[Prepared], ids: np.ndarray) -> np.ndarray:
        """Videos uint8 `[B, T, H, W, 3]`."""
        conds = self.stage2_conditions(items, ids)
        return to_uint8(self.s2.decode(self.s2.sample(conds, [p.request.seed for p in items], self.settings)))

    # ---- end to end
    def generate(self, requests: Sequence[Request], out_dir: str) -> list[dict]:
        """Generate every request, `batch_size` at a time; write `<name>.mp4`, `<name>_side_by_side.mp4`,
        `<name>.json` under `out_dir`. Returns the JSON records."""
        os.makedirs(out_dir, exist_ok=True)
        prepared = [self.prepare(r) for r in requests]
        records = []
        for start in range(0, len(prepared), self.batch_size):
            group = prepared[start:start + self.batch_size]
            padded = group + [group[-1]] * (self.batch_size - len(group))
            ids, _ = self.run_stage1(padded)
            videos = self.run_stage2(padded, ids)
            for i, p in enumerate(group):
                traj = trajectory_lib.render_ids(ids[i])
                still = np.broadcast_to(p.image, videos[i].shape)
                base = os.path.join(out_dir, p.request.name)
                video_io.write_video(base + ".mp4", videos[i], fps=self.fps)
                video_io.write_video(base + "_side_by_side.mp4", np.concatenate([still, traj, videos[i]], axis=2),
                                     fps=self.fps)
                rec = self.record(p, base)
                with open(base + ".json", "w") as f:
                    json.dump(rec, f, indent=2)
                records.append(rec)
        return records

    def record(self, p: Prepared, base: str) -> dict:
        return {
            "name": p.request.name, "video": base + ".mp4", "side_by_side": base + "_side_by_side.mp4",
            "image": p.request.image if isinstance(p.request.image, str) else "<array>",
            "caption": p.plan.caption, "motion_prompt": p.plan.motion_prompt, "planner": p.plan.source,
            "local_prompts": p.local_prompts, "objects": p.match.to_json(p.plan, p.labels),
            "masks": p.mask_source, "seed": p.request.seed,
            "settings": dataclasses.asdict(self.settings) | {"anchor_first_frame": self.anchor_first_frame,
                                                             "frames": self.num_frames, "height": self.height,
                                                             "width": self.width, "fps": self.fps},
            "stage1": {"workdir": self.s1.stage.workdir, "step": self.s1.stage.step},
            "stage2": {"workdir": self.s2.stage.workdir, "step": self.s2.stage.step},
        }
