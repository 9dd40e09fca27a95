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

Requests, images and first-frame masks are read and checked by `requests.py` (`load_inputs`: an image of another
aspect ratio is centre-cropped as training crops clips, its masks the same); `prepare_request` does that and the
planning for the models' `Geometry`, which `Geometry.from_workdirs` reads from the configs saved in the stage workdirs
without loading any parameter, so every request can be checked before a model is loaded. `Pipeline.generate` checks
and plans every request before it runs a stage; a request that fails is recorded (`skipped: <reason>` before
generation, `failed: <reason>` during it) and the others are generated. The stages are loaded from their workdirs by
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
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from ttm_jax import config as config_lib
from ttm_jax.assembly import inputs as inputs_lib
from ttm_jax.assembly import objectives
from ttm_jax.assembly.trained import Stage, load_stage
from ttm_jax.clients import segment
from ttm_jax.data import trajectory as trajectory_lib
from ttm_jax.data import video_io
from ttm_jax.diffusion import guidance, samplers
from ttm_jax.inference import prompts as prompts_lib
from ttm_jax.inference.requests import Inputs, Request, RequestError, field_name, load_inputs, tokenize_prompts
from ttm_jax.models import tokenizer as tokenizer_lib
from ttm_jax.runtime import checkpoint as checkpoint_lib
from ttm_jax.runtime import mesh as mesh_lib


@dataclasses.dataclass(frozen=True)
class Settings:
    """Sampling settings (config.sample)."""

    num_steps: int = 20
    schedule: str = "linear_quadratic"
    shift: float = 1.0
    image_scale: float = 1.5
    text_scale: float = 3.0
    guidance_rescale: float = 0.0  # CFG rescale (guidance.rescale); 0: off


def _check_geometry(s1: ml_collections.ConfigDict, s2: ml_collections.ConfigDict) -> None:
    for key in ("num_frames", "height", "width"):
        if s1.data[key] != s2.data[key]:
            raise ValueError(f"pipeline: stage 1 was trained with data.{key}={s1.data[key]}, stage 2 with "
                             f"{s2.data[key]}; the trajectory of one must fit the other: train them with the same "
                             f"data.num_frames/height/width")


@dataclasses.dataclass(frozen=True)
class Geometry:
    """What a request must fit, from the two stages' configs: frames, frame size, fps, the most objects both take."""

    num_frames: int
    height: int
    width: int
    fps: float
    max_objects: int
    models: str = "the stage models"  # where the values come from, for messages

    @classmethod
    def from_configs(cls, stage1: ml_collections.ConfigDict | None, stage2: ml_collections.ConfigDict, *,
                     models: str = "the stage models") -> Geometry:
        """The geometry of stage configs (stage 1's and stage 2's frames and size must agree); `stage1` is None for
        the single-stage TI2V baseline in `stage2`'s place."""
        if stage1 is not None:
            _check_geometry(stage1, stage2)
        d = stage2.data
        k = int(d.max_objects) if stage1 is None else min(int(stage1.data.max_objects), int(d.max_objects))
        return cls(int(d.num_frames), int(d.height), int(d.width), float(d.fps), k, models)

    @classmethod
    def from_workdirs(cls, stage1_workdir: str, stage2_workdir: str) -> Geometry:
        """The geometry of the configs saved in the stage workdirs (`checkpoint.load_config`: no parameter is read);
        errors name `config.sample.stage<N>_workdir`. An empty `stage1_workdir` means `stage2_workdir` holds the
        single-stage TI2V baseline (stage 0)."""
        configs: list[ml_collections.ConfigDict | None] = []
        for stage, workdir in ((1, stage1_workdir), (2, stage2_workdir)):
            field = f"config.sample.stage{stage}_workdir"
            if stage == 1 and not workdir:
                configs.append(None)
                continue
            try:
                config = checkpoint_lib.load_config(workdir)
            except FileNotFoundError as e:
                raise config_lib.ConfigError(f"{field}: {e}; point it to a trained stage-{stage} workdir (python -m "
                                             f"ttm_jax.main --config=configs/stage{stage}.py --workdir=DIR)") from None
            want = (stage,) if stage == 1 or configs[0] is not None else (0,)
            if int(config.stage) not in want:
                hint = (f"point it to a stage-{stage} workdir" if want != (0,) else
                        "without config.sample.stage1_workdir it must hold the single-stage TI2V baseline "
                        "(configs/ti2v.py); set stage1_workdir for a stage-2 model")
                raise config_lib.ConfigError(f"{field}: {workdir} holds a stage-{config.stage} model; {hint}")
            configs.append(config)
        where = " and ".join(w for w in (stage1_workdir, stage2_workdir) if w)
        return cls.from_configs(*configs, models=f"the stage models (configs saved in {where})")


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
            visual = {"first": first} if cond is None else {"first": first, "cond": cond}
            zeros = {k: jnp.zeros_like(v) for k, v in visual.items()}
            return guidance.GuidanceConds(none={**zeros, **null}, image={**visual, **null}, full={**visual, **full})

        def velocity(x, t, params, conds, scales):
            guide = guidance.guided if guidance_mode == "batched" else guidance.guided_three_calls
            return guide(lambda x3, t3, c: model(x3, t3, params, c), x, t, conds, scales[0], scales[1],
                         scales[2] if scales.shape[0] > 2 else 0.0)

        def decode(latent):
            return jnp.clip(modules.autoencoder.decode(latent), -1.0, 1.0)

        self._conditions = jax.jit(conditions)
        self.self_condition = config_lib.self_condition(config)
        self._sample = jax.jit(lambda noise, ts, params, conds, scales: objectives.sample(
            self.objective, velocity, noise, ts, params, conds, scales, self_condition=self.self_condition))
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
        """The objective's sampling times for `settings`, descending (rectified flow: `[num_steps + 1]` times from 1 to
        0; ddim_v: `[num_steps]` timesteps)."""
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
        scales = [settings.image_scale, settings.text_scale] + ([settings.guidance_rescale]
                                                                 if settings.guidance_rescale else [])
        scales = jnp.asarray(scales, jnp.float32)
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
    """A request after checking, mask loading and planning, at the stages' resolution."""

    request: Request
    image: np.ndarray  # uint8 [H, W, 3]
    masks: np.ndarray  # bool [H, W, K] first-frame masks, in object-id order
    labels: list[str | None]
    mask_source: str
    plan: prompts_lib.Plan
    match: prompts_lib.Match
    local_prompts: list[str]  # in object-id order (mask order)
    inputs: Inputs | None = None  # the checked inputs (size, crop)


def prepare_request(req: Request, geometry: Geometry, *, llm_client: Any = None, match: str = "auto",
                    segmenter: segment.Segmenter | None = None) -> Prepared:
    """Check and load a request for models of `geometry` (`requests.load_inputs`), then plan its prompts (the LLM
    client's `complete`, else the offline planner) and match them to its masks. Needs no model: run it on every
    request before the stages are loaded. Raises `RequestError` (or the planner's error) naming the request.
    `segmenter` (`segment.from_config`): boxes -> SAM2 masks, names -> boxes (Grounding DINO)."""
    inputs = load_inputs(req, geometry.height, geometry.width, geometry.max_objects, models=geometry.models,
                         segmenter=segmenter)
    image, masks, labels = inputs.image, inputs.masks, inputs.labels
    k = masks.shape[-1]
    if req.local_prompts is not None:
        motion = req.motion_prompt
        if not motion:
            try:
                motion = prompts_lib.plan_offline(req.caption).motion_prompt
            except prompts_lib.PlanningError:
                motion = req.caption  # no clause structure to strip: the caption itself carries the motion
        plan = prompts_lib.Plan(req.caption, motion, list(req.local_prompts),
                                [prompts_lib.object_phrase(p) for p in req.local_prompts], "given")
        matched = prompts_lib.Match(list(range(k)), "given")
    else:
        if llm_client is not None:
            names = labels if all(labels) else None
            plan = prompts_lib.plan_with_llm(req.caption, llm_client.complete, num_objects=k, object_names=names)
        else:
            try:
                plan = prompts_lib.plan_offline(req.caption)
            except prompts_lib.PlanningError as e:
                raise RequestError(f"{field_name(req, 'caption')}: {e}") from None
        if req.motion_prompt:
            plan.motion_prompt = req.motion_prompt
        matched = prompts_lib.match_prompts_to_masks(plan, k, labels=labels, image=image, masks=masks, rule=match)
    return Prepared(req, image, masks, labels, inputs.mask_source, plan, matched, matched.local_prompts(plan), inputs)


def reason(error: BaseException) -> str:
    """An exception as one line for a request's status: the message of a user error (`ValueError`, `OSError`, the
    LLM client's errors), else `<type>: <message>`."""
    text = " ".join(str(error).split())
    if isinstance(error, (ValueError, OSError)):
        return text
    return f"{type(error).__name__}: {text}"


def status_record(req: Request | None, status: str, *, name: str = "", source: str = "") -> dict:
    """The record of a request that was not generated (`status` = `skipped: <reason>` or `failed: <reason>`, or
    `pending`): its name, where it came from, no outputs."""
    image = None
    if req is not None:
        image = req.image if isinstance(req.image, str) else "<array>"
    return {"name": req.name if req is not None else name, "status": status,
            "source": req.source if req is not None else source, "image": image,
            "video": None, "side_by_side": None, "json": None}


class Pipeline:
    """Both stages and the planner; `generate(requests, out_dir)` writes the videos. With `stage1=None`, `stage2` is
    the single-stage TI2V baseline (stage 0): image + caption (+ local prompts) -> video, no trajectory."""

    def __init__(self, stage1: Stage | None, stage2: Stage, settings: Settings = Settings(), *,
                 llm_client: Any = None, match: str = "auto", anchor_first_frame: bool = True, batch_size: int = 1):
        if (stage1 is None) != (stage2.stage == 0):
            raise ValueError(f"pipeline: stage 2 at {stage2.workdir} is a stage-{stage2.stage} model; "
                             + ("the TI2V baseline (stage 0) runs alone: leave config.sample.stage1_workdir empty"
                                if stage1 is not None else "it needs a stage-1 model (config.sample.stage1_workdir)"))
        where = " and ".join(s.workdir for s in (stage1, stage2) if s is not None)
        self.geometry = Geometry.from_configs(None if stage1 is None else stage1.config, stage2.config,
                                              models=f"the stage models (configs saved in {where})")
        self.s1 = None if stage1 is None else StageRunner(stage1)
        self.s2 = StageRunner(stage2)
        self.settings, self.llm, self.match = settings, llm_client, match
        self.anchor_first_frame, self.batch_size = anchor_first_frame, max(1, int(batch_size))
        g = self.geometry
        self.num_frames, self.height, self.width, self.fps = g.num_frames, g.height, g.width, g.fps

    @classmethod
    def from_workdirs(cls, stage1_workdir: str, stage2_workdir: str, settings: Settings = Settings(),
                      *, ema: bool = True, devices: Sequence[jax.Device] | None = None, **kw) -> Pipeline:
        """Both stages from their workdirs; an empty `stage1_workdir` loads the TI2V baseline from `stage2_workdir`.
        `devices`: the stages' mesh devices (`load_stage`; default all)."""
        if not stage1_workdir:
            return cls(None, load_stage(stage2_workdir, 0, field="config.sample.stage2_workdir", ema=ema,
                                        devices=devices), settings, **kw)
        return cls(load_stage(stage1_workdir, 1, ema=ema, devices=devices),
                   load_stage(stage2_workdir, 2, ema=ema, devices=devices), settings, **kw)

    # ---- planning
    def prepare(self, req: Request) -> Prepared:
        """`prepare_request` for this pipeline's geometry, LLM client and matching rule."""
        return prepare_request(req, self.geometry, llm_client=self.llm, match=self.match)

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

    def stage2_conditions(self, items: Sequence[Prepared], ids: np.ndarray | None) -> guidance.GuidanceConds:
        return self.s2.conditions(self._batch(self.s2.stage, items, ids))

    def run_stage2(self, items: Sequence[Prepared], ids: np.ndarray | None) -> np.ndarray:
        """Videos uint8 `[B, T, H, W, 3]` (`ids` None: the TI2V baseline, conditioned on the image alone)."""
        conds = self.stage2_conditions(items, ids)
        return to_uint8(self.s2.decode(self.s2.sample(conds, [p.request.seed for p in items], self.settings)))

    # ---- end to end
    def generate(self, requests: Sequence[Request | Prepared], out_dir: str, *, keep_going: bool = True,
                 progress: Callable[[int, dict], None] | None = None) -> list[dict]:
        """Generate every request, `batch_size` at a time; write `<name>.mp4`, `<name>_side_by_side.mp4`,
        `<name>.json` under `out_dir`. Every request is checked and planned (`prepare`; a `Prepared` one is taken as
        is) before any stage runs. Returns one record per request, in order, each with its `status`: `done` (with
        the output paths), `skipped: <reason>` (its check or planning failed) or `failed: <reason>` (generation of
        its batch raised; the traceback is logged). `keep_going=False` raises the first error instead. `progress(i,
        record)` is called as request i's record is final."""
        os.makedirs(out_dir, exist_ok=True)
        records: list[dict | None] = [None] * len(requests)

        def finish(i: int, rec: dict) -> None:
            records[i] = rec
            if progress is not None:
                progress(i, rec)

        ready: list[tuple[int, Prepared]] = []
        for i, item in enumerate(requests):
            if isinstance(item, Prepared):
                ready.append((i, item))
                continue
            try:
                ready.append((i, self.prepare(item)))
            except Exception as e:  # noqa: BLE001 - any per-request error skips that request only
                if not keep_going:
                    raise
                finish(i, status_record(item, f"skipped: {reason(e)}"))
        for start in range(0, len(ready), self.batch_size):
            group = ready[start:start + self.batch_size]
            try:
                self._generate_batch(group, out_dir, finish)
            except Exception as e:  # noqa: BLE001 - a failed batch fails its requests only
                if not keep_going:
                    raise
                logging.error("generation of %s failed:\n%s", [p.request.name for _, p in group],
                              traceback.format_exc())
                for i, p in group:
                    if records[i] is None:
                        finish(i, status_record(p.request, f"failed: {reason(e)}"))
        return records

    def _generate_batch(self, group: Sequence[tuple[int, Prepared]], out_dir: str,
                        finish: Callable[[int, dict], None]) -> None:
        """Both stages over one batch (padded to `batch_size` by repetition); writes each request's files."""
        items = [p for _, p in group]
        padded = items + [items[-1]] * (self.batch_size - len(items))
        ids = self.run_stage1(padded)[0] if self.s1 is not None else None
        videos = self.run_stage2(padded, ids)
        for j, (i, p) in enumerate(group):
            still = np.broadcast_to(p.image, videos[j].shape)
            panels = [still] if ids is None else [still, trajectory_lib.render_ids(ids[j])]
            base = os.path.join(out_dir, p.request.name)
            video_io.write_video(base + ".mp4", videos[j], fps=self.fps)
            video_io.write_video(base + "_side_by_side.mp4", np.concatenate([*panels, videos[j]], axis=2),
                                 fps=self.fps)
            rec = self.record(p, base)
            with open(base + ".json", "w") as f:
                json.dump(rec, f, indent=2)
            finish(i, rec)

    def record(self, p: Prepared, base: str) -> dict:
        """The JSON record of a generated request (written to `<name>.json`; a line of `samples.jsonl`)."""
        return {
            "name": p.request.name, "status": "done", "source": p.request.source,
            "video": base + ".mp4", "side_by_side": base + "_side_by_side.mp4", "json": base + ".json",
            "image": p.request.image if isinstance(p.request.image, str) else "<array>",
            "crop": p.inputs.crop_json() if p.inputs is not None else None,
            "caption": p.plan.caption, "motion_prompt": p.plan.motion_prompt, "planner": p.plan.source,
            "local_prompts": p.local_prompts, "objects": p.match.to_json(p.plan, p.labels),
            "masks": p.mask_source, "seed": p.request.seed,
            "settings": dataclasses.asdict(self.settings) | {"anchor_first_frame": self.anchor_first_frame,
                                                             "frames": self.num_frames, "height": self.height,
                                                             "width": self.width, "fps": self.fps},
            "stage1": None if self.s1 is None else {"workdir": self.s1.stage.workdir, "step": self.s1.stage.step},
            "stage2": {"workdir": self.s2.stage.workdir, "step": self.s2.stage.step},
        }
