"""The held-out motion-binding benchmark: multi-object synthetic scenes whose objects move in different directions.

    python -m ttm_jax.eval.motion_bench --out=DIR --num_scenes=N [--seed=0] [--height=32 --width=32 --frames=9
        --fps=12]

Give the stage configs' `data.height`, `data.width`, `data.num_frames` and `data.fps` (the defaults are the tiny
config's). Writes

    DIR/scenes/scene_XXXX/first_frame.png     uint8 [H, W, 3]: the clip's first frame
    DIR/scenes/scene_XXXX/masks/<label>.png   one binary mask per object (0 / 255), file name = label ("red_square"),
                                              in object order (as `configs/sample.py` masks are given)
    DIR/scenes/scene_XXXX/video.mp4           the ground-truth clip, [T, H, W, 3] at `fps` (H.264 4:4:4, near-lossless)
    DIR/scenes/scene_XXXX/masks.npz           `masks`: bool [T, H, W, K], each object's visible pixels per frame
    DIR/scenes/scene_XXXX/scene.json          the scene's manifest entry (written last: marks a finished scene)
    DIR/requests.jsonl                        one generation request per scene (`inference/requests.py: read_requests`)
    DIR/manifest.json                         parameters, scenes (caption, motion prompt, local prompts, each object's
                                              colour, shape, direction and scale change, the generator's SceneSpec),
                                              rejection counts; written last: its presence marks a finished folder

Held out: training's synthetic data is `synthetic.sample_scene(config.seed, i)` for videos i < data.synthetic_num_videos
(`data/loader.py: synthetic_params`), i.e. generator seeds = the training seeds (0, 1, 2, ... in practice). The
benchmark draws from generator seed `BENCH_SEED_OFFSET + seed` (10_000 and up), whose random streams
(`np.random.default_rng([seed, index])`) are disjoint from every training seed below 10_000; keep `config.seed` below
10_000 and the two never meet.

Clips are cut as training cuts synthetic clips: the scene is rendered at >= 128 pixels on the short side
(`MIN_RENDER_SIDE`, as `loader.MIN_SYNTHETIC_SIDE`) and 24 fps with `SOURCE_MARGIN_FRAMES` frames more than a clip
spans (as `loader.synthetic_params`), so objects move at the training clips' speed; the clip takes the frames
`clips.clip_frame_indices` gives from frame 0 at `fps` and is resized as `clips.resize_frames` / `resize_ids` do. The
masks are exact per clip frame (not the nearest annotated frame).

Scenes are `sample_scene(BENCH_SEED_OFFSET + seed, index, split="multi", rung=rung)` for index 0, 1, 2, ... (`--rung`:
the ladder rung of `config.data.synthetic_rung`; 4, the default, is the full set's multi-object scenes), kept only when
  - at least two objects move, in different directions (`different_directions`; the one object of rungs 1-2 moves);
  - every object is seen in every clip frame (`lost_object`), with at least `MIN_VISIBLE` of its area unoccluded
    (`occluded`), so that colour finds it whole;
  - the motion measured on the ground-truth masks (`motion.motion_of`) clearly matches every object's stated motion
    (`motion.clearly_matches`, `unclear_motion`), so that the judge's verdict on a generated video is about the video.
Rejections are counted by reason in the manifest. Everything is a pure function of the arguments: re-running with the
same arguments leaves the folder as it is, an interrupted run resumes at the first unfinished scene, and a larger
`num_scenes` extends a benchmark without changing its first scenes.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import flags
from PIL import Image

from ttm_jax import cli, storage
from ttm_jax.data import clips, synthetic, video_io
from ttm_jax.data import trajectory as trajectory_lib
from ttm_jax.eval import motion as motion_lib
from ttm_jax.inference import requests as requests_lib

BENCH_SEED_OFFSET = 10_000  # generator seed = BENCH_SEED_OFFSET + seed; training uses generator seed = config.seed
SOURCE_FPS = float(synthetic.FPS)
MIN_RENDER_SIDE = 128  # as data/loader.py MIN_SYNTHETIC_SIDE
SOURCE_MARGIN_FRAMES = 16  # as data/loader.py synthetic_params: source frames = clip span + 16
MIN_VISIBLE = 0.85  # every object keeps this share of its area unoccluded in every clip frame
FORMAT = 1
MANIFEST = "manifest.json"
REQUESTS = "requests.jsonl"
SCENES = "scenes"
SCENE_FILE = "scene.json"
MAX_CANDIDATES_PER_SCENE = 200
# the ground-truth mp4: near-lossless H.264 with full-resolution colour (4:4:4): at 32x32, 4:2:0's 16x16 chroma would
# blur small objects' colours, which the judge finds them by; reproducible bytes
MP4_SETTINGS = {**synthetic.MP4_SETTINGS, "pix_fmt": "yuv444p"}

# area of each shape at unit radius (synthetic._shape_mask's definitions)
_UNIT_AREA = {"square": 4.0, "disc": math.pi, "diamond": 2.0 * 1.2**2, "triangle": 3.0 * math.sqrt(3.0) / 4 * 1.15**2}


@dataclasses.dataclass(frozen=True)
class ClipGeometry:
    """How a benchmark clip is cut: `frames` frames of `height x width` at `fps` from a scene rendered at
    `render_height x render_width`, `source_frames` frames at 24 fps; `frame_indices` [T] the source frames taken."""

    height: int
    width: int
    frames: int
    fps: float
    render_height: int
    render_width: int
    source_frames: int
    frame_indices: tuple[int, ...]


def clip_geometry(height: int, width: int, frames: int, fps: float) -> ClipGeometry:
    """The geometry of `frames` x `height` x `width` clips at `fps`, as training cuts them from synthetic videos."""
    if height < 2 or width < 2 or height % 2 or width % 2:
        raise cli.BadInput(f"motion_bench --height={height} --width={width}: give even sides >= 2 (H.264 yuv420p)")
    if frames < 2:
        raise cli.BadInput(f"motion_bench --frames={frames}: a clip needs >= 2 frames to show motion")
    if not 0 < fps <= SOURCE_FPS:
        raise cli.BadInput(f"motion_bench --fps={fps}: must be in (0, {SOURCE_FPS:g}] (the generator's fps)")
    scale = max(1, math.ceil(MIN_RENDER_SIDE / min(height, width)))
    rh, rw = height * scale, width * scale
    span = 1 + math.ceil((frames - 1) * SOURCE_FPS / fps)
    source = span + SOURCE_MARGIN_FRAMES
    # one annotated start (frame 0): the clip starts where the first-frame masks are
    idx, _ = clips.clip_frame_indices(source, synthetic.ANNOTATION_STRIDE, 1, frames, fps, SOURCE_FPS,
                                      np.random.default_rng(0), file="motion_bench")
    return ClipGeometry(height, width, frames, float(fps), rh + rh % 2, rw + rw % 2, source,
                        tuple(int(i) for i in idx))


def synthetic_seed(seed: int) -> int:
    """The generator seed of benchmark seed `seed` (>= 0): `BENCH_SEED_OFFSET + seed`."""
    if seed < 0:
        raise cli.BadInput(f"motion_bench --seed={seed}: must be >= 0")
    return BENCH_SEED_OFFSET + int(seed)


def render_clip(scene: synthetic.SceneSpec, gen_seed: int, index: int,
                geometry: ClipGeometry) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A scene (in render pixels, `geometry.source_frames` frames) as a benchmark clip ->
    (video uint8 [T, H, W, 3], masks bool [T, H, W, K], render-resolution masks bool [T, rh, rw, K])."""
    frames, masks = synthetic.render(scene, gen_seed, index)
    idx = np.asarray(geometry.frame_indices)
    box = clips.crop_box(scene.height, scene.width, geometry.height, geometry.width)
    out_hw = (geometry.height, geometry.width)
    video = clips.resize_frames(frames[idx], box, out_hw)
    ids = clips.resize_ids(trajectory_lib.ids_from_masks(masks[idx]), box, out_hw)
    return video, trajectory_lib.masks_from_ids(ids, len(scene.objects)), masks[idx]


def visible_fractions(scene: synthetic.SceneSpec, render_masks: np.ndarray, geometry: ClipGeometry) -> np.ndarray:
    """float [T, K]: each object's visible area over its whole (unoccluded) area in each clip frame, at render
    resolution (the whole area from the shape's formula; ~1 for an unoccluded object)."""
    t = np.asarray(geometry.frame_indices, np.float64) / max(scene.frames - 1, 1)
    out = np.empty((len(t), len(scene.objects)))
    for k, o in enumerate(scene.objects):
        s = 1.0 + t * (synthetic.SCALE_CHANGE[o.scale_change] - 1.0)
        out[:, k] = render_masks[..., k].sum((1, 2)) / (_UNIT_AREA[o.shape] * (o.radius * s) ** 2)
    return out


def moving_directions(scene: synthetic.SceneSpec) -> set[str]:
    """The distinct directions of the scene's moving objects."""
    return {o.direction for o in scene.objects if o.direction != motion_lib.STILL}


def rejection(scene: synthetic.SceneSpec, masks: np.ndarray, render_masks: np.ndarray,
              geometry: ClipGeometry) -> str | None:
    """Why a candidate scene is not a benchmark scene (module docstring), or None when it is one. A one-object scene
    (ladder rungs 1 and 2) needs its object to move; a scene of several, two of them in different directions."""
    if len(moving_directions(scene)) < min(2, len(scene.objects)):
        return "different_directions"
    if not masks.any((1, 2)).all():
        return "lost_object"
    if visible_fractions(scene, render_masks, geometry).min() < MIN_VISIBLE:
        return "occluded"
    for o, track in zip(scene.objects, motion_lib.tracks_from_masks(masks), strict=True):
        if not motion_lib.clearly_matches(motion_lib.motion_of(track), o.direction, o.scale_change):
            return "unclear_motion"
    return None


def swap_motions(scene: synthetic.SceneSpec, i: int, j: int) -> synthetic.SceneSpec:
    """The scene with objects i and j's directions exchanged (each keeps its own travel length, appearance, scale
    change and spin; a start is moved only as far as needed to keep the path inside the frame). For validating
    judges: a video of it binds the two motions to the wrong objects."""
    objs = list(scene.objects)
    a, b = objs[i], objs[j]
    objs[i], objs[j] = _redirect(a, b.direction, scene), _redirect(b, a.direction, scene)
    return dataclasses.replace(scene, objects=tuple(objs))


def _redirect(obj: synthetic.ObjectSpec, direction: str, scene: synthetic.SceneSpec) -> synthetic.ObjectSpec:
    ux, uy = synthetic.DIRECTIONS[direction][0]
    travel = max(abs(obj.displacement[0]), abs(obj.displacement[1]))
    # the generator's bound on the object's extent: corners at its largest scale, +1 px
    rb = obj.radius * max(1.0, synthetic.SCALE_CHANGE[obj.scale_change]) * math.sqrt(2.0) + 1.0
    dx = ux * min(travel, scene.width - 2 * rb)
    dy = uy * min(travel, scene.height - 2 * rb)
    x0 = float(np.clip(obj.start[0], rb - min(dx, 0.0), scene.width - rb - max(dx, 0.0)))
    y0 = float(np.clip(obj.start[1], rb - min(dy, 0.0), scene.height - rb - max(dy, 0.0)))
    return dataclasses.replace(obj, start=(x0, y0), displacement=(float(dx), float(dy)), direction=direction)


# ------------------------------------------------------------------------------------------------------ files


def label(obj: synthetic.ObjectSpec) -> str:
    """An object's label: "red square"; its mask file is `masks/red_square.png`."""
    return obj.name


def png_bytes(array: np.ndarray) -> bytes:
    """uint8 `[H, W]` or `[H, W, 3]` -> PNG file bytes."""
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def npz_bytes(**arrays: np.ndarray) -> bytes:
    """Arrays -> compressed `.npz` file bytes."""
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


def params(*, seed: int, height: int, width: int, frames: int, fps: float, rung: int = synthetic.FULL_RUNG) -> dict:
    """What a benchmark folder is a function of (besides `num_scenes`); `rung` only below the full set, so a folder
    written before the ladder existed still matches."""
    p = {"format": FORMAT, "seed": int(seed), "synthetic_seed": synthetic_seed(seed), "height": int(height),
         "width": int(width), "frames": int(frames), "fps": float(fps)}
    return p if rung == synthetic.FULL_RUNG else {**p, "rung": int(rung)}


def _object_entry(k: int, o: synthetic.ObjectSpec) -> dict:
    return {"label": label(o), "colour": o.colour, "rgb": list(synthetic.OBJECT_COLOURS[o.colour]), "shape": o.shape,
            "texture": o.texture, "direction": o.direction, "scale_change": o.scale_change, "spin": bool(o.spin),
            "local_prompt": o.local_prompt(), "palette_id": k + 1}


def _write_scene(folder: str, name: str, index: int, scene: synthetic.SceneSpec, video: np.ndarray,
                 masks: np.ndarray, p: dict, rejected: dict[str, int]) -> dict:
    """Writes one scene's files (scene.json last) and returns its manifest entry."""
    entry = synthetic.caption_entry(synthetic.video_id(index), scene)
    mask_files = []
    for k, o in enumerate(scene.objects):
        rel = f"masks/{label(o).replace(' ', '_')}.png"
        mask = np.where(masks[0, :, :, k], 255, 0).astype(np.uint8)
        storage.write_bytes_atomic(os.path.join(folder, rel), png_bytes(mask))
        mask_files.append(rel)
    storage.write_bytes_atomic(os.path.join(folder, "first_frame.png"), png_bytes(video[0]))
    mp4 = video_io.encode_video(video, p["fps"], **MP4_SETTINGS)
    storage.write_bytes_atomic(os.path.join(folder, "video.mp4"), mp4)
    storage.write_bytes_atomic(os.path.join(folder, "masks.npz"), npz_bytes(masks=masks))
    out = {
        "name": name, "index": int(index), "params": p, "rejected_before": rejected,
        "caption": entry["caption"], "motion_prompt": entry["motion_prompt"],
        "local_prompts": [entry["local_prompts"][str(k)] for k in range(len(scene.objects))],
        "objects": [_object_entry(k, o) for k, o in enumerate(scene.objects)],
        "files": {"first_frame": "first_frame.png", "masks": mask_files, "video": "video.mp4",
                  "masks_npz": "masks.npz"},
        "scene_spec": dataclasses.asdict(scene),
    }
    storage.write_json_atomic(os.path.join(folder, SCENE_FILE), out, sort_keys=False)
    return out


def _total_rejections(entries: Sequence[dict]) -> dict[str, int]:
    out: dict[str, int] = {}
    for e in entries:
        for k, v in e.get("rejected_before", {}).items():
            out[k] = out.get(k, 0) + v
    return dict(sorted(out.items()))


def scene_name(i: int) -> str:
    return f"scene_{i:04d}"


def make_benchmark(out_dir: str, num_scenes: int, *, seed: int = 0, height: int = 32, width: int = 32,
                   frames: int = 9, fps: float = 12.0, rung: int = synthetic.FULL_RUNG) -> Benchmark:
    """Writes (or finishes, or leaves as it is) the benchmark folder `out_dir` (module docstring); returns it loaded.

    Raises ValueError when `out_dir` holds a benchmark of other parameters (seed, size, frames, fps)."""
    if num_scenes < 1:
        raise cli.BadInput(f"motion_bench --num_scenes={num_scenes}: must be >= 1")
    if rung not in synthetic.RUNGS:
        raise cli.BadInput(f"motion_bench --rung={rung!r}: choose one of {sorted(synthetic.RUNGS)}")
    p = params(seed=seed, height=height, width=width, frames=frames, fps=fps, rung=rung)
    geometry = clip_geometry(height, width, frames, fps)
    manifest_path = os.path.join(out_dir, MANIFEST)
    old = storage.read_json(manifest_path, missing=None)
    if old is not None and old.get("params") != p:
        raise ValueError(f"{manifest_path}: a benchmark of parameters {old.get('params')} is there, not {p}; give "
                         f"another --out or the same parameters")
    if old is not None and old.get("num_scenes") == num_scenes:
        return load_benchmark(out_dir)
    gen_seed = p["synthetic_seed"]
    entries = []
    index = 0
    for i in range(num_scenes):
        name = scene_name(i)
        folder = os.path.join(out_dir, SCENES, name)
        done = storage.read_json(os.path.join(folder, SCENE_FILE), missing=None)
        if done is not None and done.get("params") == p and done.get("index", -1) >= index:
            entries.append(done)
            index = done["index"] + 1
            continue
        rejected: dict[str, int] = {}
        for _ in range(MAX_CANDIDATES_PER_SCENE):
            scene = synthetic.sample_scene(gen_seed, index, split="multi", height=geometry.render_height,
                                           width=geometry.render_width, frames=geometry.source_frames, rung=rung)
            video, masks, render_masks = render_clip(scene, gen_seed, index, geometry)
            why = rejection(scene, masks, render_masks, geometry)
            if why is None:
                entries.append(_write_scene(folder, name, index, scene, video, masks, p, rejected))
                index += 1
                break
            rejected[why] = rejected.get(why, 0) + 1
            index += 1
        else:
            raise RuntimeError(f"motion_bench: no acceptable scene among {MAX_CANDIDATES_PER_SCENE} candidates "
                               f"before index {index} at {width}x{height}, {frames} frames at {fps:g} fps; the clip "
                               f"is too short or small to show the motions clearly: raise --frames or the size")
    lines = []
    for e in entries:
        req = {"name": e["name"], "image": f"{SCENES}/{e['name']}/{e['files']['first_frame']}",
               "caption": e["caption"], "masks": [f"{SCENES}/{e['name']}/{m}" for m in e["files"]["masks"]],
               "motion_prompt": e["motion_prompt"], "local_prompts": e["local_prompts"]}
        requests_lib.Request.from_json(req, where=f"{REQUESTS}:{e['name']}")  # the reader accepts it
        lines.append(json.dumps(req))
    storage.write_bytes_atomic(os.path.join(out_dir, REQUESTS), ("\n".join(lines) + "\n").encode())
    manifest = {"params": p, "num_scenes": num_scenes, "held_out": (
                    f"generator seed {gen_seed} = {BENCH_SEED_OFFSET} + seed; training uses generator seed = "
                    f"config.seed (< {BENCH_SEED_OFFSET})"),
                "geometry": dataclasses.asdict(geometry),
                "rejected": _total_rejections(entries), "scenes": entries}
    storage.write_json_atomic(manifest_path, manifest, sort_keys=False)
    return load_benchmark(out_dir)


# ---------------------------------------------------------------------------------------------------- reading


@dataclasses.dataclass(frozen=True)
class BenchScene:
    """One benchmark scene as its manifest entry describes it; `folder` holds its files."""

    name: str
    folder: str
    entry: dict

    @property
    def objects(self) -> list[dict]:
        """Per object: label, colour, rgb, shape, texture, direction, scale_change, spin, local_prompt, palette_id."""
        return self.entry["objects"]

    @property
    def caption(self) -> str:
        return self.entry["caption"]

    @property
    def local_prompts(self) -> list[str]:
        return self.entry["local_prompts"]

    def video(self) -> np.ndarray:
        """The ground-truth clip, decoded: uint8 [T, H, W, 3]."""
        return video_io.read_frames(os.path.join(self.folder, self.entry["files"]["video"]))

    def masks(self) -> np.ndarray:
        """The ground-truth masks: bool [T, H, W, K]."""
        with np.load(os.path.join(self.folder, self.entry["files"]["masks_npz"])) as z:
            return z["masks"].astype(bool)

    def first_frame(self) -> np.ndarray:
        """uint8 [H, W, 3]."""
        with Image.open(os.path.join(self.folder, self.entry["files"]["first_frame"])) as im:
            return np.asarray(im.convert("RGB"), np.uint8)

    def spec(self) -> synthetic.SceneSpec:
        """The generator's scene (render pixels, source frames), for re-rendering variants (`swap_motions`)."""
        d = dict(self.entry["scene_spec"])
        objs = []
        for o in d.pop("objects"):
            o = dict(o)
            o["start"], o["displacement"] = tuple(o["start"]), tuple(o["displacement"])
            objs.append(synthetic.ObjectSpec(**o))
        return synthetic.SceneSpec(**d, objects=tuple(objs))


@dataclasses.dataclass(frozen=True)
class Benchmark:
    """A finished benchmark folder: its parameters, clip geometry and scenes (in order)."""

    folder: str
    params: dict
    geometry: ClipGeometry
    scenes: list[BenchScene]

    def scene(self, name: str) -> BenchScene:
        for s in self.scenes:
            if s.name == name:
                return s
        raise KeyError(f"{os.path.join(self.folder, MANIFEST)}: no scene {name!r}; scenes are "
                       f"{[s.name for s in self.scenes][:5]}...")

    def render(self, scene: BenchScene, spec: synthetic.SceneSpec | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(video uint8 [T, H, W, 3], masks bool [T, H, W, K]) of `spec` (default the scene's own) rendered as the
        scene's clip, without the codec."""
        video, masks, _ = render_clip(spec or scene.spec(), self.params["synthetic_seed"], scene.entry["index"],
                                      self.geometry)
        return video, masks


def load_benchmark(out_dir: str) -> Benchmark:
    """A finished benchmark folder; raises FileNotFoundError naming the manifest and the fix when there is none."""
    path = os.path.join(out_dir, MANIFEST)
    m = storage.read_json(path, missing=None)
    if m is None:
        raise FileNotFoundError(f"{path}: no benchmark manifest; make one with `python -m ttm_jax.eval.motion_bench "
                                f"--out={out_dir} --num_scenes=N`")
    g = dict(m["geometry"])
    g["frame_indices"] = tuple(g["frame_indices"])
    scenes = [BenchScene(e["name"], os.path.join(out_dir, SCENES, e["name"]), e) for e in m["scenes"]]
    return Benchmark(out_dir, m["params"], ClipGeometry(**g), scenes)


def static_share(objects: Sequence[dict[str, Any]]) -> float:
    """The share of objects that neither move nor change size: what a video that never moves scores."""
    return sum(o["direction"] == motion_lib.STILL and o["scale_change"] == motion_lib.SCALE_NONE
               for o in objects) / max(len(objects), 1)


def main(argv: Sequence[str]) -> None:
    """Builds the benchmark under `--out` and says what it holds."""
    del argv
    f = flags.FLAGS
    bench = make_benchmark(f.out, f.num_scenes, seed=f.seed, height=f.height, width=f.width, frames=f.frames,
                           fps=f.fps, rung=f.rung)
    k = sum(len(s.objects) for s in bench.scenes)
    print(f"motion_bench: {len(bench.scenes)} scenes, {k} objects under {f.out} (generator seed "
          f"{bench.params['synthetic_seed']}); requests in {os.path.join(f.out, REQUESTS)}")


def define_flags() -> None:
    """The flags of `main` (defined only when this module runs, so importing it defines nothing)."""
    flags.DEFINE_string("out", None, "output folder", required=True)
    flags.DEFINE_integer("num_scenes", 64, "number of scenes")
    flags.DEFINE_integer("seed", 0, f"benchmark seed; the generator seed is {BENCH_SEED_OFFSET} + seed")
    flags.DEFINE_integer("height", 32, "clip height (config.data.height; even)")
    flags.DEFINE_integer("width", 32, "clip width (config.data.width; even)")
    flags.DEFINE_integer("frames", 9, "clip frames (config.data.num_frames)")
    flags.DEFINE_float("fps", 12.0, "clip frame rate (config.data.fps)")
    flags.DEFINE_integer("rung", synthetic.FULL_RUNG, "ladder rung of the scenes (config.data.synthetic_rung; "
                         "synthetic.RUNGS); 4: the full set's multi-object scenes")


if __name__ == "__main__":
    define_flags()
    cli.run(main)
