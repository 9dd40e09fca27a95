"""Clips: N frames at a target fps from an SA-V video, with their object masks, trajectory and prompts.

`make_example(ref, caption_entry, data_config, seed)` returns the training example of CONTRIBUTING.md:

  video          uint8 [T, H, W, 3]      T = data.num_frames, (H, W) = (data.height, data.width)
  trajectory     uint8 [T, H, W, 3]      palette-coloured (`trajectory.render`), object k+1 in PALETTE[k+1]
  object_masks   bool  [T, H, W, K]      K = data.max_objects, exclusive (lower id wins), zero-padded
  caption, motion_prompt  str
  local_prompts  list[str] of length K   '' for absent objects
  num_objects    int
  video_id       str
  frame_indices  int32 [T]               24 fps video frames of the clip
  mask_frame_indices int32 [T]           the annotated video frame each frame's mask comes from
  masklet_keys   list[str] of length K   the masklet behind each object slot ('' for padding)

Seeds. Clip `c` of a video takes `clip_seed(seed, video_id, c)`; `data_settings(config.data)` are the settings
(`DATA_KEYS`) that make clips different, which a prepared folder pins.

Sampling. Frames are taken every `source_fps / data.fps` video frames (24 -> 12 fps: every 2nd), rounded, from a
start on an annotated frame, so frame 0's masks (s0, what stage 1 starts from) are exact. SA-V annotates every 4th
frame (6 fps); a frame between annotations takes the masks of the nearest annotated frame (`mask_frame_indices`
says which). At `data.fps = 6` every frame is annotated.

Objects. Up to K masklets (`trajectory.select_objects`): those the captioner gave a local prompt, if it gave any;
visible in the crop at frame 0 with at least `data.min_object_area` of it; ranked by size and motion over the annotated
frames the clip uses (`data.motion_weight`); object slots 1..K in masklet order.

Geometry. One crop box in source pixels (the largest box of the output aspect ratio; centred, or random with
`data.crop = "random"`) and one resize to (H, W): bilinear (antialiased) for frames, nearest for the object-id map,
so masks and frames stay aligned. Portrait videos (SA-V has 848x480 H x W ones) are cropped the same way.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np
from PIL import Image

from ttm_jax.data import sav, trajectory
from ttm_jax.data.captions import CaptionEntry
from ttm_jax.data.video_io import SkipVideo

# The data-config keys that make clips (and so prepared records) different: a change needs a new prepared folder.
DATA_KEYS = ("num_frames", "height", "width", "fps", "max_objects", "annotation", "missing_captions", "crop",
             "min_object_area", "motion_weight")


def data_settings(data_config: ml_collections.ConfigDict | Mapping[str, Any]) -> dict:
    """The `DATA_KEYS` settings of `data_config` (a `config.data` or a plain dict), unset ones left out: what a
    prepared folder pins (`prepare.json`, the TFDS builder config, the default-data fingerprint)."""
    return {k: data_config.get(k) for k in DATA_KEYS if data_config.get(k) is not None}


def clip_seed(seed: int, video_id: str, clip: int) -> int:
    """The seed of clip `clip` of `video_id`: independent of chunking, worker count and the other videos (so
    `prepare` and the TFDS builder cut the same clips for the same `seed`)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{video_id}:{clip}".encode()).digest()[:8], "little") >> 1


def clip_frame_indices(num_video_frames: int, stride: int, num_annotated: int, num_frames: int, fps: float,
                       source_fps: float, rng: np.random.Generator, *, file: str = "") -> tuple[np.ndarray, np.ndarray]:
    """-> (frame_indices int32 [T], mask_positions int32 [T]): video frames of a clip and, for each, the annotated
    position (index into the masklet) whose masks it takes (nearest annotated frame; exact at frame 0).

    Raises `SkipVideo("too_short")` if no annotated start leaves room for `num_frames` frames.
    """
    if fps <= 0 or fps > source_fps:
        raise ValueError(f"config.data.fps={fps}: must be in (0, {source_fps}] (the source video's fps)")
    step = source_fps / fps
    offsets = np.floor(np.arange(num_frames) * step + 0.5).astype(np.int64)
    span = int(offsets[-1])
    starts = np.arange(num_annotated, dtype=np.int64) * stride
    starts = starts[starts + span <= num_video_frames - 1]
    if not starts.size:
        raise SkipVideo("too_short", file, f"{num_video_frames} frames at {source_fps:g} fps cannot hold "
                        f"{num_frames} frames at {fps:g} fps ({span + 1} source frames); lower config.data.num_frames "
                        f"or raise config.data.fps")
    start = int(rng.choice(starts))
    frames = start + offsets
    pos = np.clip(np.floor(frames / stride + 0.5), 0, num_annotated - 1).astype(np.int32)
    return frames.astype(np.int32), pos


def crop_box(height: int, width: int, out_height: int, out_width: int, *, mode: str = "center",
             rng: np.random.Generator | None = None) -> tuple[float, float, float, float]:
    """(left, top, right, bottom) in source pixels: the largest box of aspect `out_width/out_height` inside the
    `height x width` frame; centred, or at a uniformly random offset (`mode="random"`)."""
    scale = min(height / out_height, width / out_width)
    ch, cw = out_height * scale, out_width * scale
    if mode == "center":
        top, left = (height - ch) / 2, (width - cw) / 2
    elif mode == "random":
        rng = rng or np.random.default_rng()
        top, left = rng.uniform(0, height - ch), rng.uniform(0, width - cw)
    else:
        raise ValueError(f"config.data.crop={mode!r}; choose center or random")
    return float(left), float(top), float(left + cw), float(top + ch)


def resize_frames(frames: np.ndarray, box: tuple[float, float, float, float], size: tuple[int, int]) -> np.ndarray:
    """uint8 `[T, h, w, 3]` -> `[T, H, W, 3]`: crop `box` and resize to `size = (H, W)`, bilinear (antialiased)."""
    h, w = size
    return np.stack([np.asarray(Image.fromarray(f).resize((w, h), Image.Resampling.BILINEAR, box=box))
                     for f in frames])


def resize_ids(ids: np.ndarray, box: tuple[float, float, float, float], size: tuple[int, int]) -> np.ndarray:
    """int `[T, h, w]` object ids (< 256) -> `[T, H, W]`: the same crop and resize as `resize_frames`, nearest."""
    h, w = size
    return np.stack([np.asarray(Image.fromarray(i.astype(np.uint8)).resize((w, h), Image.Resampling.NEAREST, box=box))
                     for i in ids]).astype(np.int32)


def make_example(ref: sav.VideoRef, caption_entry: CaptionEntry | None, data_config: ml_collections.ConfigDict,
                 seed: int) -> dict:
    """One training example (module docstring) from one SA-V video; deterministic in `seed`.

    Raises `SkipVideo` (message names the file) for a video that cannot be used: no caption, bad annotation (or no
    masklets), slower than `data.fps` (`low_fps`), undecodable or truncated mp4, size mismatch, too short.
    """
    return make_examples(ref, caption_entry, data_config, [seed])[0]


def make_examples(ref: sav.VideoRef, caption_entry: CaptionEntry | None, data_config: ml_collections.ConfigDict,
                  seeds: Sequence[int]) -> list[dict]:
    """`[make_example(ref, caption_entry, data_config, s) for s in seeds]`, reading the annotation once."""
    if caption_entry is None:
        raise SkipVideo("missing_caption", ref.video.name, f"video {ref.video_id} has no line in the captions "
                        "sidecar")
    ann = sav.read_annotation(ref)
    check_fps(ann, float(data_config.fps))
    return [_example(ref, ann, caption_entry, data_config, int(s)) for s in seeds]


def check_fps(ann: sav.Annotation, fps: float) -> None:
    """Raises `SkipVideo("low_fps")`, naming the json, if the video (`ann.fps = video_frame_count / video_duration`)
    is slower than the clips' `fps` (config.data.fps): its frames cannot be sampled at that rate."""
    if fps > ann.fps:
        raise SkipVideo("low_fps", ann.file, f"the video is {ann.fps:g} fps (video_frame_count / video_duration = "
                        f"{ann.video_frame_count} / {ann.video_frame_count / ann.fps:g} s), below config.data.fps="
                        f"{fps:g}: clips cannot be sampled at {fps:g} fps from it; lower config.data.fps to at most "
                        f"{ann.fps:g}, or drop video {ann.video_id} (or fix its video_duration)")


_DECODERS: dict[int, concurrent.futures.ThreadPoolExecutor] = {}


def _decoder() -> concurrent.futures.ThreadPoolExecutor:
    """This process' one video-decoding thread (per pid: a forked worker must not inherit its parent's)."""
    pid = os.getpid()
    if pid not in _DECODERS:
        _DECODERS[pid] = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="clips-decode")
    return _DECODERS[pid]


def _example(ref: sav.VideoRef, ann: sav.Annotation, caption_entry: CaptionEntry,
             d: ml_collections.ConfigDict, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    k_max = int(d.max_objects)
    frame_idx, pos = clip_frame_indices(ann.video_frame_count, ann.stride, ann.num_annotated, int(d.num_frames),
                                        float(d.fps), ann.fps, rng, file=ref.video.name)
    uniq, inverse = np.unique(pos, return_inverse=True)
    # objects the captioner described, if it described any: the local prompts are what stage 2 learns from
    prompts = {k: v for k, v in caption_entry.local_prompts.items() if v}
    candidates = [i for i, key in enumerate(ann.masklet_keys) if key in prompts] if prompts else None
    out_hw = (int(d.height), int(d.width))
    box = crop_box(ann.height, ann.width, *out_hw, mode=d.get("crop", "center"), rng=rng)
    left, top, right, bottom = (int(round(v)) for v in box)
    min_area = float(d.get("min_object_area", 0.0))
    # decode only masklets that can qualify: visible enough at the clip's first frame even before cropping (the RLE
    # area needs no decode; auto annotations can carry dozens of masklets)
    area0 = ann.areas_at(int(pos[0]))
    need = max(1.0, min_area * (bottom - top) * (right - left))
    pool = [i for i in (range(ann.num_masklets) if candidates is None else candidates) if area0[i] >= need]

    # the video decodes on a thread while the masks are worked on here (PyAV and numpy release the GIL)
    decoding = _decoder().submit(sav.read_frames, ref, frame_idx)
    try:
        masks = ann.masks(uniq, pool)  # [U, h, w, len(pool)]: each annotated frame the clip uses, once
        # choose among what the crop keeps (an object outside the box is not in the clip), scored over those frames
        picked = trajectory.select_objects(masks[:, top:bottom, left:right], k_max, min_area=min_area,
                                           motion_weight=float(d.get("motion_weight", 1.0)))
        chosen = [pool[i] for i in picked]
        ids = resize_ids(trajectory.ids_from_masks(masks[..., picked]), box, out_hw)[inverse.reshape(-1)]  # [T,H,W]
    finally:
        frames = decoding.result()  # a decode error wins: it says what is wrong with the file
    if frames.shape[1:3] != (ann.height, ann.width):
        raise SkipVideo("size_mismatch", ref.video.name, f"decodes to {frames.shape[1]}x{frames.shape[2]} (HxW) but "
                        f"{ann.file} says {ann.height}x{ann.width}")
    # an object thinner than an output pixel can vanish in the resize; s0 must show every object, so drop it
    kept = [k for k in range(len(chosen)) if (ids[0] == k + 1).any()]
    if len(kept) < len(chosen):
        remap = np.zeros(len(chosen) + 1, np.int32)
        remap[np.asarray(kept, np.int64) + 1] = np.arange(1, len(kept) + 1)
        ids, chosen = remap[ids], [chosen[k] for k in kept]
    n = len(chosen)
    keys = [ann.masklet_keys[c] for c in chosen]
    return {
        "video": resize_frames(frames, box, out_hw),
        "trajectory": trajectory.render_ids(ids),
        "object_masks": trajectory.masks_from_ids(ids, k_max),
        "caption": caption_entry.caption,
        "motion_prompt": caption_entry.motion_prompt,
        "local_prompts": [caption_entry.local_prompts.get(k, "") for k in keys] + [""] * (k_max - n),
        "num_objects": n,
        "video_id": ref.video_id,
        "frame_indices": frame_idx.astype(np.int32),
        "mask_frame_indices": (pos * ann.stride).astype(np.int32),
        "masklet_keys": keys + [""] * (k_max - n),
    }

