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

The models are rebuilt from the config saved beside each stage's checkpoints (`<workdir>/checkpoints/<step>/config`,
the latest step), with the frozen text encoder initialised exactly as training did (`train.step.init_frozen`), and the
conditions are made by the very functions training uses (`train.step.prepare`, `drop_text_conditions`): what the
model sees at sampling is what it saw in training, condition dropout included ("null" image = zeros, "null" text = the
empty prompt, for the caption and every local-prompt slot).

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
from ttm_jax.data import trajectory as trajectory_lib
from ttm_jax.diffusion import flow, guidance, samplers
from ttm_jax.inference import prompts as prompts_lib

# ---------------------------------------------------------------------------------------------------------- inputs


@dataclasses.dataclass
class Request:
    """One video to generate.

    image: path (PNG/JPEG, any size; resized to the stage configs' data.height x data.width) or uint8 `[H, W, 3]`.
    masks: first-frame object masks, one of: a list of PNG paths (one binary mask per object; the file name is the
      object's label), one PNG of object ids (0 background, 1..K), an SA-V annotation json (`path.json` or
      `path.json:i` for annotated frame i, default 0), a json of COCO RLEs (a list of `{"size", "counts"}` or of
      `{"segmentation": rle, "label": ...}`), the same list inline, or a bool array `[H, W, K]`.
    boxes: `[[x0, y0, x1, y1], ...]` in the input image's pixels (used when there are no masks).
    labels: object labels (for boxes or arrays), matched to the local prompts' object phrases.
    motion_prompt / local_prompts: skip planning and use these (local prompts in mask order).
    """

    image: Any
    caption: str
    masks: Any = None
    boxes: Any = None
    labels: list[str] | None = None
    motion_prompt: str | None = None
    local_prompts: list[str] | None = None
    seed: int = 0
    name: str = "sample"

    @classmethod
    def from_json(cls, d: dict, *, base_dir: str = "", where: str = "request") -> Request:
        """A JSONL line: `{"image", "caption", "masks"?, "boxes"?, "labels"?, "motion_prompt"?, "local_prompts"?,
        "seed"?, "name"?}`; relative paths are read from `base_dir`."""
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: "
                             f"{[f.name for f in dataclasses.fields(cls)]}")
        for key in ("image", "caption"):
            if not d.get(key):
                raise ValueError(f"{where}: `{key}` is required")

        def rel(p):
            return p if not isinstance(p, str) or os.path.isabs(p) or not base_dir else os.path.join(base_dir, p)

        masks = d.get("masks")
        if isinstance(masks, str):
            masks = rel(masks)
        elif isinstance(masks, list) and masks and isinstance(masks[0], str):
            masks = [rel(m) for m in masks]
        return cls(image=rel(d["image"]), caption=d["caption"], masks=masks, boxes=d.get("boxes"),
                   labels=d.get("labels"), motion_prompt=d.get("motion_prompt"), local_prompts=d.get("local_prompts"),
                   seed=int(d.get("seed", 0)), name=str(d.get("name", "sample")))


def read_requests(path: str) -> list[Request]:
    """Requests from a JSONL file (one object per line; blank lines and `#` comments skipped)."""
    out = []
    base = os.path.dirname(os.path.abspath(path))
    with open(path) as f:
        for i, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            try:
                d = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: not JSON ({e})") from None
            r = Request.from_json(d, base_dir=base, where=f"{path}:{i}")
            if "name" not in d:
                r.name = f"{os.path.splitext(os.path.basename(path))[0]}_{i:04d}"
            out.append(r)
    if not out:
        raise ValueError(f"{path}: no requests (config.sample.requests)")
    names = [r.name for r in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"{path}: request names {dup} repeat; give each line a distinct `name`")
    return out


def load_image(image: Any, height: int, width: int) -> tuple[np.ndarray, tuple[int, int]]:
    """`(uint8 [height, width, 3], (original H, original W))`; bilinear resize (PIL)."""
    from PIL import Image

    if isinstance(image, (str, os.PathLike)):
        if not os.path.exists(image):
            raise FileNotFoundError(f"pipeline: image {image!r} does not exist (config.sample.image or the request's "
                                    f"`image`)")
        pil = Image.open(image).convert("RGB")
    else:
        arr = np.asarray(image)
        if arr.ndim != 3 or arr.shape[-1] != 3:
            raise ValueError(f"pipeline: image array must be uint8 [H, W, 3], got {arr.shape}")
        pil = Image.fromarray(arr.astype(np.uint8))
    size = (pil.height, pil.width)
    if size != (height, width):
        pil = pil.resize((width, height), Image.BILINEAR)
    return np.asarray(pil, np.uint8), size


def _resize_masks(masks: np.ndarray, height: int, width: int) -> np.ndarray:
    """bool `[h, w, K]` -> bool `[height, width, K]`, nearest neighbour."""
    h, w = masks.shape[:2]
    if (h, w) == (height, width):
        return masks.astype(bool)
    ys = np.minimum((np.arange(height) + 0.5) * h / height, h - 1).astype(int)
    xs = np.minimum((np.arange(width) + 0.5) * w / width, w - 1).astype(int)
    return masks[ys][:, xs].astype(bool)


def _decode_rles(rles: list, where: str) -> np.ndarray:
    from pycocotools import mask as mask_utils

    fixed = []
    for i, r in enumerate(rles):
        if not isinstance(r, dict) or "size" not in r or "counts" not in r:
            raise ValueError(f"{where}: entry {i} is not a COCO RLE {{'size': [h, w], 'counts': ...}}")
        if isinstance(r["counts"], list):  # uncompressed RLE
            r = mask_utils.frPyObjects(r, *r["size"])
        elif isinstance(r["counts"], str):
            r = {"size": r["size"], "counts": r["counts"].encode()}
        fixed.append(r)
    return mask_utils.decode(fixed).astype(bool).reshape(*fixed[0]["size"], len(fixed))


def load_masks(req: Request, image_size: tuple[int, int], height: int,
               width: int) -> tuple[np.ndarray, list[str | None], str]:
    """First-frame masks of a request at `[height, width, K]`, their labels and a description of the source."""
    from PIL import Image

    h0, w0 = image_size
    labels: list[str | None]
    m = req.masks
    if m is None and req.boxes is None:
        raise ValueError(f"pipeline: request {req.name!r} has neither masks nor boxes; give the first-frame object "
                         f"masks (config.sample.masks) or boxes (config.sample.boxes)")
    if m is None:
        boxes = np.asarray(req.boxes, np.float64).reshape(-1, 4)
        masks = np.zeros((h0, w0, len(boxes)), bool)
        for k, (x0, y0, x1, y1) in enumerate(boxes):
            if not (0 <= x0 < x1 <= w0 and 0 <= y0 < y1 <= h0):
                raise ValueError(f"pipeline: box {k} {[x0, y0, x1, y1]} of request {req.name!r} is not inside the "
                                 f"{w0}x{h0} image as [x0, y0, x1, y1] with x0 < x1, y0 < y1")
            masks[int(round(y0)):int(round(y1)), int(round(x0)):int(round(x1)), k] = True
        labels, source = list(req.labels or [None] * len(boxes)), "boxes"
    elif isinstance(m, np.ndarray):
        masks, labels, source = m.astype(bool), list(req.labels or [None] * m.shape[-1]), "array"
    elif isinstance(m, list) and m and all(isinstance(x, dict) for x in m):  # inline COCO RLEs (JSONL requests)
        masks = _decode_rles([x.get("segmentation", x) for x in m], f"request {req.name!r} masks")
        labels = list(req.labels or [x.get("label") if "segmentation" in x else None for x in m])
        source = "inline coco rle"
    elif isinstance(m, str) and (m.endswith(".json") or ".json:" in m):
        path, _, frame = m.partition(".json")
        path += ".json"
        frame = int(frame[1:]) if frame.startswith(":") else 0
        with open(path) as f:
            data = json.load(f)
        if isinstance(data, dict) and "masklet" in data:  # SA-V annotation
            if not 0 <= frame < len(data["masklet"]):
                raise ValueError(f"{path}: annotated frame {frame} out of range [0, {len(data['masklet'])})")
            masks = _decode_rles(data["masklet"][frame], f"{path} masklet[{frame}]")
            ids = data.get("masklet_id")
            labels, source = [None] * masks.shape[-1], f"sa-v {path} annotated frame {frame}"
            if ids is not None:
                source += f" (masklet ids {list(ids)})"
        elif isinstance(data, list):
            rles = [d.get("segmentation", d) for d in data]
            labels = [d.get("label") or d.get("category") or d.get("name") if "segmentation" in d else None
                      for d in data]
            masks, source = _decode_rles(rles, path), f"coco rle {path}"
        else:
            raise ValueError(f"{path}: neither an SA-V annotation (with `masklet`) nor a list of COCO RLEs")
    else:
        paths = [m] if isinstance(m, str) else list(m)
        arrays = []
        for p in paths:
            if not os.path.exists(p):
                raise FileNotFoundError(f"pipeline: mask {p!r} does not exist (config.sample.masks)")
            arrays.append(np.asarray(Image.open(p)))
        if len(arrays) == 1 and arrays[0].ndim == 2 and arrays[0].max() > 1 and len(np.unique(arrays[0])) <= 27 \
                and arrays[0].max() < 27:  # one PNG of object ids
            ids = arrays[0].astype(np.int32)
            masks = trajectory_lib.masks_from_ids(ids, int(ids.max()))
            labels, source = [None] * masks.shape[-1], f"id map {paths[0]}"
        else:
            def binary(a):
                if a.ndim == 3 and a.shape[-1] == 4:
                    return a[..., 3] > 127 if a[..., 3].min() < 255 else a[..., :3].max(-1) > 127
                return (a.max(-1) if a.ndim == 3 else a) > (127 if a.max() > 1 else 0)

            masks = np.stack([binary(a) for a in arrays], -1)
            labels = [os.path.splitext(os.path.basename(p))[0].replace("_", " ") for p in paths]
            source = "png " + ", ".join(paths)
        if req.labels:
            labels = list(req.labels)
    if masks.shape[:2] != (h0, w0):
        raise ValueError(f"pipeline: masks of request {req.name!r} are {masks.shape[1]}x{masks.shape[0]}, the image "
                         f"is {w0}x{h0}; they must be the first frame's masks at the image's size")
    if labels and len(labels) != masks.shape[-1]:
        raise ValueError(f"pipeline: {len(labels)} labels for {masks.shape[-1]} masks in request {req.name!r}")
    return _resize_masks(masks, height, width), labels, source


# ---------------------------------------------------------------------------------------------------------- stages


@dataclasses.dataclass
class Stage:
    """A trained stage rebuilt from its workdir: config, modules, (EMA) params, frozen text encoder, mesh."""

    config: ml_collections.ConfigDict
    modules: Any
    params: Any
    frozen: dict[str, Any]
    mesh: jax.sharding.Mesh
    rules: Any
    step: int
    workdir: str

    @property
    def stage(self) -> int:
        return int(self.config.stage)


def load_stage(workdir: str, stage: int, *, field: str = "", ema: bool = True) -> Stage:
    """The latest checkpoint of `workdir` with the config saved beside it; `stage` is checked. Only the parameters are
    read (`checkpoint.restore_params`): the EMA ones when `ema` and the run kept an EMA, else the raw ones."""
    from ttm_jax.runtime import checkpoint as checkpoint_lib
    from ttm_jax.train import loop as loop_lib
    from ttm_jax.runtime import mesh as mesh_lib
    from ttm_jax.runtime import sharding as sharding_lib
    from ttm_jax.train import step as step_lib

    field = field or f"config.sample.stage{stage}_workdir"
    if not workdir:
        raise ValueError(f"{field} is empty; set it to a stage-{stage} training workdir (python -m ttm_jax.main "
                         f"--config=configs/stage{stage}.py --workdir=DIR)")
    ckpt = checkpoint_lib.Checkpointer(workdir, async_save=False)
    try:
        step = ckpt.latest_step()
        if step is None:
            raise FileNotFoundError(f"{field}: {checkpoint_lib.checkpoint_dir(workdir)} holds no checkpoint; train "
                                    f"stage {stage} there first (python -m ttm_jax.main "
                                    f"--config=configs/stage{stage}.py --workdir={workdir})")
        config = ckpt.restore_config(step)
    finally:
        ckpt.close()
    if int(config.stage) != stage:
        raise ValueError(f"{field}: {workdir} holds a stage-{config.stage} model; point it to a stage-{stage} "
                         f"workdir")
    try:
        mesh = mesh_lib.make_mesh(config.mesh)
    except mesh_lib.MeshError:
        # trained on another device count: sampling only needs the parameters, so shard them over all devices here
        fallback = ml_collections.ConfigDict({"shape": {"data": 1, "fsdp": -1, "tensor": 1}})
        mesh = mesh_lib.make_mesh(fallback)
    rules = sharding_lib.rules_from_config(config.mesh)
    modules = step_lib.build_modules(config)
    init_params = loop_lib.make_init_params(config, modules)
    shard_unannotated = bool(config.mesh.get("shard_unannotated", True))
    param_shardings = sharding_lib.tree_shardings(jax.eval_shape(init_params, jax.random.PRNGKey(int(config.seed))),
                                                  mesh, rules, shard_unannotated=shard_unannotated)
    # params only: the AdamW moments are never read
    params = checkpoint_lib.restore_params(workdir, step, ema=ema, shardings=param_shardings).params
    frozen, _ = step_lib.init_frozen(config, modules, mesh, rules)
    return Stage(config, modules, params, frozen, mesh, rules, int(step), str(workdir))


@dataclasses.dataclass(frozen=True)
class Settings:
    """Sampling settings (config.sample)."""

    num_steps: int = 20
    schedule: str = "linear_quadratic"
    shift: float = 1.0
    image_scale: float = 1.5
    text_scale: float = 3.0

    def time_grid(self) -> np.ndarray:
        return samplers.time_grid(int(self.num_steps), self.schedule, shift=float(self.shift))


def tokenize_prompts(config: ml_collections.ConfigDict, tokenizer: Any, caption: str, motion: str,
                     local: Sequence[str]) -> dict[str, np.ndarray]:
    """Token ids and masks as the training batches hold them (`data/pipeline.py`): caption and motion prompt at
    `max_length`; local slots `[K+1, Lp]`, slot 0 the caption, slot k the local prompt of object k, an empty prompt
    with no tokens at all (mask all False)."""
    t, k = config.text_encoder, int(config.data.max_objects)
    if len(local) > k:
        raise ValueError(f"pipeline: {len(local)} objects but the stage-{config.stage} model takes at most "
                         f"data.max_objects={k}; give fewer masks")
    (cap_ids, mot_ids), (cap_mask, mot_mask) = tokenizer.encode([caption, motion], int(t.max_length))
    slots = [caption, *local, *[""] * (k - len(local))]
    loc_ids, loc_mask = tokenizer.encode(slots, int(t.local_max_length))
    empty = np.array([i > 0 and not s for i, s in enumerate(slots)])
    loc_mask = np.where(empty[:, None], False, loc_mask)
    loc_ids = np.where(loc_mask, loc_ids, 0)
    return {"caption_tokens": cap_ids.astype(np.int32), "caption_mask": cap_mask.astype(bool),
            "motion_tokens": mot_ids.astype(np.int32), "motion_mask": mot_mask.astype(bool),
            "local_tokens": loc_ids.astype(np.int32), "local_mask": loc_mask.astype(bool)}


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
        from ttm_jax.models import conditioning
        from ttm_jax.train import step as step_lib

        if guidance_mode not in ("batched", "three_calls"):
            raise ValueError(f"pipeline.StageRunner: guidance_mode={guidance_mode!r}; choose batched or three_calls")
        self.stage = stage
        config, modules = stage.config, stage.modules
        self.latent_shape = config_lib.latent_shape(config)

        def conditions(frozen, batch):
            _, first, cond, text = step_lib.prepare(config, modules, frozen, batch)
            b = first.shape[0]
            full = step_lib.drop_text_conditions(config, modules, frozen, text, jnp.zeros((b,), bool))
            null = step_lib.drop_text_conditions(config, modules, frozen, text, jnp.ones((b,), bool))
            zeros = dict(first=jnp.zeros_like(first), cond=jnp.zeros_like(cond))
            return guidance.GuidanceConds(none={**zeros, **null}, image={"first": first, "cond": cond, **null},
                                          full={"first": first, "cond": cond, **full})

        def velocity(x, t, params, conds, scales):
            def apply(x3, t3, c):
                inp = conditioning.stage_input(config.stage, x3, c["first"], c["cond"])
                kw = {k: v for k, v in c.items() if k not in ("first", "cond", "context")}
                return modules.model.apply({"params": params}, inp, flow.wan_timestep(t3), c["context"], **kw)

            guide = guidance.guided if guidance_mode == "batched" else guidance.guided_three_calls
            return guide(apply, x, t, conds, scales[0], scales[1])

        def decode(latent):
            return jnp.clip(modules.autoencoder.decode(latent), -1.0, 1.0)

        self._conditions = jax.jit(conditions)
        self._sample = jax.jit(lambda noise, ts, params, conds, scales: samplers.euler_sample(
            velocity, noise, ts, params, conds, scales))
        self._decode = jax.jit(decode)
        self.velocity = velocity

    def _ctx(self):
        s = self.stage
        return _Contexts(jax.set_mesh(s.mesh), nn.logical_axis_rules(s.rules))

    def place(self, tree: Any) -> Any:
        """Batch-leading arrays onto the stage's mesh: split over data/fsdp when the batch divides, else replicated."""
        from ttm_jax.runtime import mesh as mesh_lib

        mesh = self.stage.mesh
        b = jax.tree.leaves(tree)[0].shape[0]
        if b % mesh_lib.batch_parallelism(mesh) == 0:
            return samplers.shard_batch(tree, mesh)
        return jax.device_put(tree, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))

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
            return self._sample(self.place(self.noise(seeds)), jnp.asarray(settings.time_grid()), self.stage.params,
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
        from ttm_jax.models import tokenizer as tokenizer_lib

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
        from ttm_jax.data import video_io

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
