"""Synthetic SA-V: textured shapes with known motion, written in the real SA-V train format.

    python -m ttm_jax.data.synthetic --out=DIR --num_videos=N --seed=S [--split=single|multi|mixed]
        [--height=128 --width=128 --frames=48] [--videos_per_shard=32] [--with_auto] [--rung=1|2|3|4]

writes

    DIR/sav_000.tar, sav_001.tar, ...   members `sav_000/sav_XXXXXX.mp4` (H.264, 24 fps, yuv420p) and
                                        `sav_000/sav_XXXXXX_manual.json` (every documented SA-V field, real COCO RLE
                                        every 4th frame; `_auto.json` too with `--with_auto`)
    DIR/captions.jsonl                  {"video_id", "caption", "motion_prompt", "local_prompts", "category"}
    DIR/synthetic.json                  the parameters, written last: its presence marks a complete folder

Each video has a textured background and 1-4 textured objects (square, disc, triangle, diamond) of distinct colours;
every object moves on its own (one of 8 directions or still, at constant speed, optionally growing/shrinking or
spinning), later objects occlude earlier ones (each object keeps at least 70% of its area visible on every annotated
frame, so visible-mask centroids follow the stated motion). Captions, motion prompt and local prompts are written from
the same parameters that drive the renderer, so they are true by construction; tests check them against the decoded
masks. `--rung` picks a rung of the ladder of difficulty (`RUNGS`): 1, one plain object translating at a speed the
prompt names; 2, at a random speed; 3, two or three objects each with its own direction (binding); 4, the full set
above (the default). Everything is a pure function of (seed, video index): the same seed gives bit-identical tars
and json, and a larger `num_videos` extends a folder without changing its first videos.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import tarfile
from collections.abc import Sequence

import numpy as np
from absl import flags
from pycocotools import mask as mask_utils

from ttm_jax import cli, storage
from ttm_jax.data import video_io

FPS = 24
ANNOTATION_STRIDE = 4  # SA-V annotates every 4th frame of its 24 fps videos (6 fps)
# `video_io.encode_video` settings of the mp4s: H.264 yuv420p, near-lossless, reproducible bytes
MP4_SETTINGS = {"crf": 12, "preset": "veryfast", "reproducible": True}
CAPTIONS_FILE = "captions.jsonl"
DONE_FILE = "synthetic.json"
SPLITS = ("single", "multi", "mixed")

# Saturated object colours and muted background colours, so objects stand out and keep their name under H.264.
OBJECT_COLOURS = {
    "red": (215, 40, 40), "green": (40, 175, 60), "blue": (40, 80, 220), "yellow": (235, 210, 40),
    "purple": (140, 55, 190), "orange": (245, 135, 25), "cyan": (40, 200, 210), "white": (240, 240, 240),
}
BACKGROUND_COLOURS = {
    "grey": (105, 105, 105), "brown": (105, 75, 50), "dark blue": (35, 45, 85), "olive": (90, 95, 50),
}
SHAPES = ("square", "disc", "triangle", "diamond")
OBJECT_TEXTURES = ("striped", "dotted", "checkered", "plain")
BACKGROUND_TEXTURES = ("checkered", "striped", "wavy", "speckled")
# direction name -> (unit vector in image coordinates (x right, y down), phrase)
DIRECTIONS = {
    "left": ((-1.0, 0.0), "slides left"),
    "right": ((1.0, 0.0), "slides right"),
    "up": ((0.0, -1.0), "rises"),
    "down": ((0.0, 1.0), "falls"),
    "up-left": ((-1.0, -1.0), "drifts up and to the left"),
    "up-right": ((1.0, -1.0), "drifts up and to the right"),
    "down-left": ((-1.0, 1.0), "drifts down and to the left"),
    "down-right": ((1.0, 1.0), "drifts down and to the right"),
    "still": ((0.0, 0.0), ""),
}
SCALE_CHANGE = {"none": 1.0, "grow": 1.6, "shrink": 0.6}
MOVING_DIRECTIONS = tuple(d for d in DIRECTIONS if d != "still")
# an object travels this share of the free room along each moving axis, uniform in the range (>= 55%: the motion
# is unmistakable); the prompts state the direction, not the share
TRAVEL_FRACTION = (0.55, 0.95)
MIN_VISIBLE_FRACTION = 0.7

# The ladder of difficulty (`--rung`): each rung adds one difficulty to the one below; rung 4 is the full set, whose
# scenes are bit-identical to those written before the ladder existed. Rungs 1-3 have plain objects (no texture, no
# scale change, no spin, never still) on a plain background.
RUNGS = {
    1: "one plain object on a plain background, translating in one of 8 directions at a speed the prompt names "
       "(slowly / quickly)",
    2: "rung 1 at a random speed the prompt does not name",
    3: "two or three plain objects in distinct colours, each translating its own way (distinct directions) at a "
       "random speed: the binding rung",
    4: "the full set: textured objects and backgrounds, 1-4 objects (--split), still objects, random speeds, scale "
       "changes and spins",
}
FULL_RUNG = 4
# rung 1: the share of the free room (`displacement`'s fraction) each speed word names
SPEEDS = {"slowly": 0.45, "quickly": 0.9}


@dataclasses.dataclass(frozen=True)
class ObjectSpec:
    """One object's appearance and motion; positions in pixels, `t` in [0, 1] over the video."""

    shape: str
    colour: str
    texture: str
    radius: float  # half-size at scale 1, pixels
    start: tuple[float, float]  # centre (x, y) at t=0
    displacement: tuple[float, float]  # centre(t) = start + t * displacement
    direction: str  # key of DIRECTIONS
    scale_change: str  # key of SCALE_CHANGE: scale(t) = 1 + t * (SCALE_CHANGE - 1)
    angle0: float  # radians
    spin: float  # total rotation over the video, radians (0: no spin)
    texture_period: float
    speed: str = ""  # a key of SPEEDS when the prompt names the speed (rung 1), else ""

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"

    def motion_phrase(self) -> str:
        mods = []
        if self.scale_change != "none":
            mods.append("growing" if self.scale_change == "grow" else "shrinking")
        if self.spin:
            mods.append("spinning")
        if self.direction != "still":
            phrase = DIRECTIONS[self.direction][1] + (f" {self.speed}" if self.speed else "")
            return phrase + (" while " + " and ".join(mods) if mods else "")
        if not mods:
            return "stays still"
        verbs = {"growing": "grows", "shrinking": "shrinks", "spinning": "spins"}
        return " and ".join(verbs[m] for m in mods) + " in place"

    def local_prompt(self) -> str:
        texture = "" if self.texture == "plain" else f" {self.texture}"
        return f"the {self.colour}{texture} {self.shape} {self.motion_phrase()}"


@dataclasses.dataclass(frozen=True)
class SceneSpec:
    height: int
    width: int
    frames: int
    background_colour: str
    background_texture: str
    background_period: float
    background_phase: float
    environment: str
    objects: tuple[ObjectSpec, ...]  # bottom to top (later objects occlude earlier ones)


@dataclasses.dataclass
class SyntheticVideo:
    """A rendered video: `frames uint8 [F, H, W, 3]`, visible `masks bool [F, H, W, K]` (K = objects)."""

    video_id: str
    scene: SceneSpec
    frames: np.ndarray
    masks: np.ndarray
    caption_entry: dict
    annotation: dict


def video_id(index: int) -> str:
    """SA-V style id; synthetic videos count from 1 as the released ones do."""
    return f"sav_{index + 1:06d}"


# ----------------------------------------------------------------------------------------------------------- scenes


def _bounding_radius(obj_radius: float, scale_change: str) -> float:
    # corners of a square/diamond at the largest scale; +1 px margin
    return obj_radius * max(1.0, SCALE_CHANGE[scale_change]) * math.sqrt(2.0) + 1.0


def displacement(direction: str, radius: float, scale_change: str, fraction: float, height: int,
                 width: int) -> tuple[float, float]:
    """(dx, dy) over the whole video of an object moving in `direction` across `fraction` of the room its largest
    extent leaves free along each moving axis (`TRAVEL_FRACTION` draws it)."""
    rb = _bounding_radius(radius, scale_change)
    ux, uy = DIRECTIONS[direction][0]
    return ux * fraction * (width - 2 * rb), uy * fraction * (height - 2 * rb)


def _start(rng: np.random.Generator, rb: float, dx: float, dy: float, height: int, width: int) -> tuple[float, float]:
    """A uniform start (x0, y0) whose whole path, displaced by (dx, dy), keeps `rb` pixels from every edge."""
    x0 = float(rng.uniform(rb, width - rb - abs(dx))) + (abs(dx) if dx < 0 else 0.0)
    y0 = float(rng.uniform(rb, height - rb - abs(dy))) + (abs(dy) if dy < 0 else 0.0)
    return x0, y0


def _sample_object(rng: np.random.Generator, colour: str, height: int, width: int) -> ObjectSpec:
    shape = SHAPES[rng.integers(len(SHAPES))]
    texture = OBJECT_TEXTURES[rng.integers(len(OBJECT_TEXTURES))]
    radius = float(rng.uniform(0.07, 0.11) * min(height, width))
    direction = list(DIRECTIONS)[rng.integers(len(DIRECTIONS))]
    scale_change = ("none", "none", "grow", "shrink")[rng.integers(4)]
    spin = 0.0
    if shape != "disc" and rng.random() < 0.3:
        spin = float(rng.choice([-1.0, 1.0]) * rng.uniform(0.5, 1.0) * math.pi)
    dx, dy = displacement(direction, radius, scale_change, float(rng.uniform(*TRAVEL_FRACTION)), height, width)
    x0, y0 = _start(rng, _bounding_radius(radius, scale_change), dx, dy, height, width)
    return ObjectSpec(shape=shape, colour=colour, texture=texture, radius=radius, start=(x0, y0),
                      displacement=(dx, dy), direction=direction, scale_change=scale_change,
                      angle0=float(rng.uniform(0, 2 * math.pi)), spin=spin,
                      texture_period=float(rng.uniform(0.35, 0.6) * radius))


def _sample_ladder_object(rng: np.random.Generator, colour: str, direction: str, rung: int, height: int,
                          width: int) -> ObjectSpec:
    """A plain object of a ladder rung below the full set: translating in `direction`, at a speed the prompt names
    (rung 1) or a random one (rungs 2-3)."""
    shape = SHAPES[rng.integers(len(SHAPES))]
    radius = float(rng.uniform(0.07, 0.11) * min(height, width))
    if rung == 1:
        speed = ("slowly", "quickly")[rng.integers(2)]
        fraction = SPEEDS[speed]
    else:
        speed, fraction = "", float(rng.uniform(*TRAVEL_FRACTION))
    dx, dy = displacement(direction, radius, "none", fraction, height, width)
    x0, y0 = _start(rng, _bounding_radius(radius, "none"), dx, dy, height, width)
    return ObjectSpec(shape=shape, colour=colour, texture="plain", radius=radius, start=(x0, y0),
                      displacement=(dx, dy), direction=direction, scale_change="none",
                      angle0=float(rng.uniform(0, 2 * math.pi)), spin=0.0, texture_period=radius, speed=speed)


def _ladder_scene(rng: np.random.Generator, rung: int, height: int, width: int, frames: int) -> SceneSpec:
    """A scene of ladder rung 1, 2 or 3 (`RUNGS`)."""
    k = 1 if rung < 3 else int(rng.integers(2, 4))
    bg_colour = list(BACKGROUND_COLOURS)[rng.integers(len(BACKGROUND_COLOURS))]
    environment = ("Indoor", "Outdoor")[rng.integers(2)]
    colours = [list(OBJECT_COLOURS)[i] for i in rng.permutation(len(OBJECT_COLOURS))[:k]]
    annotated = np.arange(0, frames, ANNOTATION_STRIDE)
    scene = None
    for _ in range(100):
        directions = [MOVING_DIRECTIONS[i] for i in rng.permutation(len(MOVING_DIRECTIONS))[:k]]
        objects = tuple(_sample_ladder_object(rng, c, d, rung, height, width)
                        for c, d in zip(colours, directions, strict=True))
        scene = SceneSpec(height, width, frames, bg_colour, "plain", 1.0, 0.0, environment, objects)
        if k == 1 or _occlusion_ok(scene, annotated):
            return scene
    while len(scene.objects) > 2:  # crowded: drop the top object while the rest still bind two motions
        scene = dataclasses.replace(scene, objects=scene.objects[:-1])
        if _occlusion_ok(scene, annotated):
            break
    return scene


def sample_scene(seed: int, index: int, *, split: str = "mixed", height: int = 128, width: int = 128,
                 frames: int = 48, rung: int = FULL_RUNG) -> SceneSpec:
    """The scene of video `index` under `seed`: a pure function of its arguments. `rung` (`RUNGS`) picks the ladder
    rung; below the full set it decides the object count and `split` is not used."""
    if split not in SPLITS:
        raise cli.BadInput(f"synthetic --split={split!r}: choose one of {SPLITS}")
    if rung not in RUNGS:
        raise cli.BadInput(f"synthetic --rung={rung!r}: choose one of {sorted(RUNGS)}")
    rng = np.random.default_rng([seed, index])
    if rung != FULL_RUNG:
        return _ladder_scene(rng, rung, height, width, frames)
    if split == "single":
        k = 1
    elif split == "multi":
        k = int(rng.integers(2, 5))
    else:
        k = int(rng.integers(1, 5))
    bg_colour = list(BACKGROUND_COLOURS)[rng.integers(len(BACKGROUND_COLOURS))]
    bg_texture = BACKGROUND_TEXTURES[rng.integers(len(BACKGROUND_TEXTURES))]
    bg_period = float(rng.uniform(0.08, 0.2) * min(height, width))
    bg_phase = float(rng.uniform(0, 2 * math.pi))
    environment = ("Indoor", "Outdoor")[rng.integers(2)]
    colours = [list(OBJECT_COLOURS)[i] for i in rng.permutation(len(OBJECT_COLOURS))[:k]]
    annotated = np.arange(0, frames, ANNOTATION_STRIDE)
    for _ in range(100):
        objects = tuple(_sample_object(rng, c, height, width) for c in colours)
        scene = SceneSpec(height, width, frames, bg_colour, bg_texture, bg_period, bg_phase, environment, objects)
        if k == 1 or _occlusion_ok(scene, annotated):
            return scene
    # crowded: drop objects until the rest satisfy the occlusion rule (deterministic, rare)
    while len(objects) > 1:
        objects = objects[:-1]
        scene = dataclasses.replace(scene, objects=objects)
        if _occlusion_ok(scene, annotated):
            return scene
    return scene


def _occlusion_ok(scene: SceneSpec, frame_indices: Sequence[int]) -> bool:
    """Every object keeps `MIN_VISIBLE_FRACTION` of its area visible on every annotated frame."""
    grid = _grid(scene)
    for f in frame_indices:
        full = np.moveaxis(_full_masks(scene, f, grid), -1, 0)  # [K, H, W], contiguous per object after copy
        above = np.zeros(full.shape[1:], bool)
        for k in range(full.shape[0] - 1, -1, -1):
            m = np.ascontiguousarray(full[k])
            if np.count_nonzero(m & ~above) < MIN_VISIBLE_FRACTION * np.count_nonzero(m):
                return False
            above |= m
    return True


# ---------------------------------------------------------------------------------------------------------- render


def _time(scene: SceneSpec, frame: int) -> float:
    return frame / max(scene.frames - 1, 1)


def _object_coords(obj: ObjectSpec, t: float, xs: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pixel centres in the object's frame (rotated, scaled): unit radius = the object's half-size."""
    cx = obj.start[0] + t * obj.displacement[0]
    cy = obj.start[1] + t * obj.displacement[1]
    s = 1.0 + t * (SCALE_CHANGE[obj.scale_change] - 1.0)
    a = obj.angle0 + t * obj.spin
    px, py = xs - cx, ys - cy
    u = (math.cos(a) * px + math.sin(a) * py) / (obj.radius * s)
    v = (-math.sin(a) * px + math.cos(a) * py) / (obj.radius * s)
    return u, v


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 1.0
    if shape == "disc":
        return u * u + v * v <= 1.0
    if shape == "diamond":
        return np.abs(u) + np.abs(v) <= 1.2
    if shape == "triangle":  # equilateral, circumradius 1.15, pointing to -v
        r = 1.15
        out = np.ones(u.shape, bool)
        for k in range(3):
            ang = -math.pi / 2 + k * 2 * math.pi / 3
            out &= u * math.cos(ang) + v * math.sin(ang) >= -r / 2
        return out
    raise ValueError(f"unknown shape {shape!r}")


def _grid(scene: SceneSpec) -> tuple[np.ndarray, np.ndarray]:
    ys, xs = np.mgrid[0:scene.height, 0:scene.width].astype(np.float64)
    return xs + 0.5, ys + 0.5


def _window(obj: ObjectSpec, t: float, scene: SceneSpec) -> tuple[slice, slice]:
    """Rows and columns that can hold the object at time `t` (its bounding circle), so rendering skips the rest."""
    cx = obj.start[0] + t * obj.displacement[0]
    cy = obj.start[1] + t * obj.displacement[1]
    r = obj.radius * (1.0 + t * (SCALE_CHANGE[obj.scale_change] - 1.0)) * 1.25 * math.sqrt(2.0) + 2.0
    return (slice(max(0, int(cy - r)), min(scene.height, int(cy + r) + 2)),
            slice(max(0, int(cx - r)), min(scene.width, int(cx + r) + 2)))


def _object_pixels(obj: ObjectSpec, t: float, scene: SceneSpec, xs: np.ndarray, ys: np.ndarray
                   ) -> tuple[tuple[slice, slice], np.ndarray, np.ndarray, np.ndarray]:
    """(window, mask, u, v) of one object at time `t`, over its window only."""
    win = _window(obj, t, scene)
    u, v = _object_coords(obj, t, xs[win], ys[win])
    return win, _shape_mask(obj.shape, u, v), u, v


def _full_masks(scene: SceneSpec, frame: int, grid: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """bool [H, W, K]: each object's whole silhouette at `frame` (occlusion ignored)."""
    xs, ys = grid or _grid(scene)
    t = _time(scene, frame)
    out = np.zeros((scene.height, scene.width, len(scene.objects)), bool)
    for k, o in enumerate(scene.objects):
        win, m, _, _ = _object_pixels(o, t, scene, xs, ys)
        out[win + (k,)] = m
    return out


def _visible(full: np.ndarray) -> np.ndarray:
    """Occlusion: an object is hidden wherever a later (upper) object is."""
    above = np.zeros(full.shape[:2], bool)
    vis = np.zeros_like(full)
    for k in range(full.shape[-1] - 1, -1, -1):
        vis[..., k] = full[..., k] & ~above
        above |= full[..., k]
    return vis


def _object_texture(texture: str, u: np.ndarray, v: np.ndarray, period: float, radius: float) -> np.ndarray:
    """Brightness multiplier in [0.6, 1]; moves with the object because it is computed in object coordinates."""
    p = period / radius
    if texture == "striped":
        return np.where(np.floor(u / p) % 2 == 0, 1.0, 0.62)
    if texture == "checkered":
        return np.where((np.floor(u / p) + np.floor(v / p)) % 2 == 0, 1.0, 0.62)
    if texture == "dotted":
        fu, fv = (u / p) % 1.0 - 0.5, (v / p) % 1.0 - 0.5
        return np.where(fu * fu + fv * fv < 0.09, 0.6, 1.0)
    return np.ones_like(u)


def _background(scene: SceneSpec, rng: np.random.Generator) -> np.ndarray:
    xs, ys = _grid(scene)
    p = scene.background_period
    if scene.background_texture == "checkered":
        m = np.where((np.floor(xs / p) + np.floor(ys / p)) % 2 == 0, 1.0, 0.75)
    elif scene.background_texture == "striped":
        m = np.where(np.floor((xs + ys) / p) % 2 == 0, 1.0, 0.75)
    elif scene.background_texture == "wavy":
        wobble = 2.0 * np.sin(2 * math.pi * ys / (3 * p))
        m = 0.85 + 0.15 * np.sin(2 * math.pi * xs / p + scene.background_phase + wobble)
    elif scene.background_texture == "plain":  # ladder rungs below the full set
        m = np.ones_like(xs)
    else:  # speckled
        m = 0.8 + 0.2 * rng.random(xs.shape)
    return m[..., None] * np.asarray(BACKGROUND_COLOURS[scene.background_colour], np.float64)


def render(scene: SceneSpec, seed: int, index: int) -> tuple[np.ndarray, np.ndarray]:
    """(frames uint8 [F, H, W, 3], visible masks bool [F, H, W, K]) of a scene."""
    rng = np.random.default_rng([seed, index, 1])
    bg = _background(scene, rng)
    xs, ys = _grid(scene)
    frames = np.empty((scene.frames, scene.height, scene.width, 3), np.uint8)
    masks = np.empty((scene.frames, scene.height, scene.width, len(scene.objects)), bool)
    for f in range(scene.frames):
        t = _time(scene, f)
        img = bg.copy()
        full = np.zeros((scene.height, scene.width, len(scene.objects)), bool)
        for k, obj in enumerate(scene.objects):
            win, m, u, v = _object_pixels(obj, t, scene, xs, ys)
            tex = _object_texture(obj.texture, u[m], v[m], obj.texture_period, obj.radius)
            img[win][m] = tex[:, None] * np.asarray(OBJECT_COLOURS[obj.colour], np.float64)
            full[win + (k,)] = m
        frames[f] = np.clip(np.round(img), 0, 255).astype(np.uint8)
        masks[f] = _visible(full)
    return frames, masks


# -------------------------------------------------------------------------------------------------- text and json


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _join(phrases: list[str]) -> str:
    if len(phrases) == 1:
        return phrases[0]
    if len(phrases) == 2 and " while " not in " ".join(phrases):
        return f"{phrases[0]} while {phrases[1]}"
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def caption_entry(vid: str, scene: SceneSpec) -> dict:
    """The captions-sidecar line of a scene; every motion statement comes from the renderer's parameters."""
    described = []
    for o in scene.objects:
        texture = "" if o.texture == "plain" else f" {o.texture}"
        described.append(_a(f"{o.colour}{texture} {o.shape} {o.motion_phrase()}"))
    caption = f"{_join(described)}, in front of {_a(scene.background_colour)} {scene.background_texture} background."
    caption = caption[0].upper() + caption[1:]
    motion = _join([f"the {o.name} {o.motion_phrase()}" for o in scene.objects]) + "."
    return {
        "video_id": vid,
        "caption": caption,
        "motion_prompt": motion[0].upper() + motion[1:],
        "local_prompts": {str(k): o.local_prompt() for k, o in enumerate(scene.objects)},
        "category": "single" if len(scene.objects) == 1 else "multi",
    }


def _size_bucket(area: float) -> str:
    # COCO-style buckets, as SA-V: small < 32^2 <= medium < 96^2 <= large
    if area < 32**2:
        return "small"
    return "medium" if area < 96**2 else "large"


def annotation_json(vid: str, scene: SceneSpec, masks: np.ndarray, masklet_type: str = "manual") -> dict:
    """The `sav_XXXXXX_{manual,auto}.json` dict, every documented field with the real files' types.

    `masks` bool [F, H, W, K] (visible parts). Semantics as the released files: annotated frames are 0, 4, 8, ...;
    `masklet_first_appeared_frame` and `masklet_frame_count` count annotated frames; `masklet_size_abs` is the mean
    area over annotated frames where the object is visible and `masklet_size_rel` that over H*W;
    `masklet_visibility_changes` counts visible<->invisible switches after the first appearance.
    """
    h, w, k = scene.height, scene.width, len(scene.objects)
    ann = masks[::ANNOTATION_STRIDE]  # [A, H, W, K]
    masklet = []
    for a in range(ann.shape[0]):
        row = []
        for j in range(k):
            rle = mask_utils.encode(np.asfortranarray(ann[a, :, :, j].astype(np.uint8)))
            row.append({"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")})
        masklet.append(row)
    areas = ann.sum((1, 2)).astype(np.float64)  # [A, K]
    visible = areas > 0
    size_abs, first, changes = [], [], []
    for j in range(k):
        vis = visible[:, j]
        size_abs.append(float(areas[vis, j].mean()) if vis.any() else 0.0)
        f0 = int(np.argmax(vis)) if vis.any() else 0
        first.append(f0)
        changes.append(int(np.sum(vis[f0 + 1:] != vis[f0:-1])))
    manual = masklet_type == "manual"
    return {
        "video_id": vid,
        "video_duration": float(scene.frames / FPS),
        "video_frame_count": float(scene.frames),
        "video_height": float(h),
        "video_width": float(w),
        "video_resolution": float(h * w),
        "video_environment": scene.environment,
        "video_split": "train",
        "masklet": masklet,
        "masklet_id": list(range(k)),
        "masklet_size_rel": [round(s / (h * w), 10) for s in size_abs],
        "masklet_size_abs": [round(s, 10) for s in size_abs],
        "masklet_size_bucket": [_size_bucket(s) for s in size_abs],
        "masklet_visibility_changes": changes,
        "masklet_first_appeared_frame": [float(f) for f in first] if manual else first,
        "masklet_frame_count": [int(ann.shape[0])] * k,
        # exact synthetic masks: "edited" on every annotated frame where the object shows (0 for auto, as SA-V)
        "masklet_edited_frame_count": [int(visible[:, j].sum()) for j in range(k)] if manual else [0] * k,
        "masklet_type": [masklet_type] * k,
        "masklet_stability_score": [None] * k if manual else [[1.0] * ann.shape[0] for _ in range(k)],
        "masklet_num": k,
    }


def make_video(seed: int, index: int, *, split: str = "mixed", height: int = 128, width: int = 128,
               frames: int = 48, with_auto: bool = False, rung: int = FULL_RUNG) -> SyntheticVideo:
    scene = sample_scene(seed, index, split=split, height=height, width=width, frames=frames, rung=rung)
    pixels, masks = render(scene, seed, index)
    vid = video_id(index)
    ann = {"manual": annotation_json(vid, scene, masks, "manual")}
    if with_auto:
        ann["auto"] = annotation_json(vid, scene, masks, "auto")
    return SyntheticVideo(vid, scene, pixels, masks, caption_entry(vid, scene), ann)


# ---------------------------------------------------------------------------------------------------------- write


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644  # fixed metadata: reproducible tar bytes
    tar.addfile(info, io.BytesIO(data))


def params(num_videos: int, seed: int, split: str, height: int, width: int, frames: int, videos_per_shard: int,
           with_auto: bool, rung: int = FULL_RUNG) -> dict:
    """What a synthetic folder is a function of (`synthetic.json`); `rung` appears only below the full set, so a
    full-set folder written before the ladder existed still matches."""
    p = {"num_videos": num_videos, "seed": seed, "split": split, "height": height, "width": width,
         "frames": frames, "videos_per_shard": videos_per_shard, "with_auto": with_auto, "fps": FPS}
    return p if rung == FULL_RUNG else {**p, "rung": int(rung)}


def is_complete(out: str, expected: dict | None = None) -> bool:
    """True if `out` holds a finished synthetic folder (with these parameters, when given)."""
    path = os.path.join(out, DONE_FILE)
    if not os.path.exists(path):
        return False
    with open(path) as f:
        return expected is None or json.load(f) == expected


def generate(out: str, num_videos: int, seed: int = 0, *, split: str = "mixed", height: int = 128, width: int = 128,
             frames: int = 48, videos_per_shard: int = 32, with_auto: bool = False,
             rung: int = FULL_RUNG) -> list[str]:
    """Writes synthetic SA-V tar shards and `captions.jsonl` into `out`; returns the shard paths.

    Files are written to temporary names and renamed, so concurrent or interrupted runs never leave a torn file, and
    `synthetic.json` (the parameters) is written last.
    """
    if num_videos < 1:
        raise cli.BadInput(f"synthetic --num_videos={num_videos}: must be >= 1")
    if frames < 1:
        raise cli.BadInput(f"synthetic --frames={frames}: must be >= 1")
    if height % 2 or width % 2:
        raise cli.BadInput(f"synthetic: --height={height} and --width={width} must be even for H.264 yuv420p")
    if rung not in RUNGS:
        raise cli.BadInput(f"synthetic --rung={rung!r}: choose one of {sorted(RUNGS)}")
    os.makedirs(out, exist_ok=True)
    shards, captions = [], []
    for s in range(math.ceil(num_videos / videos_per_shard)):
        shard = os.path.join(out, f"sav_{s:03d}.tar")
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for i in range(s * videos_per_shard, min(num_videos, (s + 1) * videos_per_shard)):
                v = make_video(seed, i, split=split, height=height, width=width, frames=frames, with_auto=with_auto,
                               rung=rung)
                folder = f"sav_{s:03d}"
                _add_member(tar, f"{folder}/{v.video_id}.mp4", video_io.encode_video(v.frames, FPS, **MP4_SETTINGS))
                for kind, ann in v.annotation.items():
                    _add_member(tar, f"{folder}/{v.video_id}_{kind}.json", json.dumps(ann).encode())
                captions.append(v.caption_entry)
        storage.write_bytes_atomic(shard, buf.getvalue())
        shards.append(shard)
    lines = "".join(json.dumps(c) + "\n" for c in captions)
    storage.write_bytes_atomic(os.path.join(out, CAPTIONS_FILE), lines.encode())
    p = params(num_videos, seed, split, height, width, frames, videos_per_shard, with_auto, rung)
    storage.write_json_atomic(os.path.join(out, DONE_FILE), p, sort_keys=False)
    return shards


def main(argv: Sequence[str]) -> None:
    """Writes `--num_videos` synthetic SA-V videos under `--out` and says where."""
    del argv
    f = flags.FLAGS
    shards = generate(f.out, f.num_videos, f.seed, split=f.split, height=f.height, width=f.width, frames=f.frames,
                      videos_per_shard=f.videos_per_shard, with_auto=f.with_auto, rung=f.rung)
    print(f"synthetic SA-V: {f.num_videos} videos in {len(shards)} shard(s) under {f.out}; "
          f"captions in {os.path.join(f.out, CAPTIONS_FILE)}")


def define_flags() -> None:
    """The flags of `main` (defined only when this module runs, so importing it defines nothing)."""
    flags.DEFINE_string("out", None, "output folder", required=True)
    flags.DEFINE_integer("num_videos", 64, "number of videos")
    flags.DEFINE_integer("seed", 0, "seed; output is a pure function of it")
    flags.DEFINE_enum("split", "mixed", list(SPLITS), "single: 1 object; multi: 2-4; mixed: 1-4 (rung 4 only)")
    flags.DEFINE_integer("rung", FULL_RUNG, "ladder rung: " + "; ".join(f"{k}: {v}" for k, v in RUNGS.items()))
    flags.DEFINE_integer("height", 128, "frame height (even)")
    flags.DEFINE_integer("width", 128, "frame width (even)")
    flags.DEFINE_integer("frames", 48, "frames at 24 fps (>= 1 + (num_frames - 1) * 24 / fps of the config)")
    flags.DEFINE_integer("videos_per_shard", 32, "videos per tar shard")
    flags.DEFINE_bool("with_auto", False, "also write `_auto.json` annotations")


if __name__ == "__main__":
    define_flags()
    cli.run(main)
