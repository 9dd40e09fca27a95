"""Generation requests: what to generate (image, caption, first-frame masks or boxes), read from JSONL or the
config, and the inputs they name loaded at the stages' resolution (image resized bilinearly, masks by nearest
neighbour), with the prompts tokenized as the training batches hold them.

Masks come in many forms (`load_masks`): a list of per-object PNGs (file name = label), one PNG of object ids, an
SA-V annotation json (`path.json[:frame]`), a json of COCO RLEs, inline RLEs, a bool array, or boxes (solid
rectangles). Every error names the request, the file and the fix.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from ttm_jax.data import trajectory as trajectory_lib


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
    """COCO RLEs (compressed, string or uncompressed counts) -> bool `[h, w, K]`."""
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


# Each mask source: `(request, (H, W) of the image) -> (bool [H, W, K], labels, description of the source)`.
Masks = tuple[np.ndarray, list, str]


def _masks_from_boxes(req: Request, size: tuple[int, int]) -> Masks:
    """Solid rectangles, one per `[x0, y0, x1, y1]` box in image pixels."""
    h0, w0 = size
    boxes = np.asarray(req.boxes, np.float64).reshape(-1, 4)
    masks = np.zeros((h0, w0, len(boxes)), bool)
    for k, (x0, y0, x1, y1) in enumerate(boxes):
        if not (0 <= x0 < x1 <= w0 and 0 <= y0 < y1 <= h0):
            raise ValueError(f"pipeline: box {k} {[x0, y0, x1, y1]} of request {req.name!r} is not inside the "
                             f"{w0}x{h0} image as [x0, y0, x1, y1] with x0 < x1, y0 < y1")
        masks[int(round(y0)):int(round(y1)), int(round(x0)):int(round(x1)), k] = True
    return masks, list(req.labels or [None] * len(boxes)), "boxes"


def _masks_from_inline_rles(req: Request) -> Masks:
    """A JSONL request's inline COCO RLEs (`{"size", "counts"}` or `{"segmentation": rle, "label": ...}`)."""
    m = req.masks
    masks = _decode_rles([x.get("segmentation", x) for x in m], f"request {req.name!r} masks")
    labels = list(req.labels or [x.get("label") if "segmentation" in x else None for x in m])
    return masks, labels, "inline coco rle"


def _masks_from_json(spec: str) -> Masks:
    """`path.json[:frame]`: an SA-V annotation (annotated frame `frame`, default 0) or a json list of COCO RLEs."""
    path, _, frame = spec.partition(".json")
    path += ".json"
    frame = int(frame[1:]) if frame.startswith(":") else 0
    with open(path) as f:
        data = json.load(f)
    if isinstance(data, dict) and "masklet" in data:  # SA-V annotation
        if not 0 <= frame < len(data["masklet"]):
            raise ValueError(f"{path}: annotated frame {frame} out of range [0, {len(data['masklet'])})")
        masks = _decode_rles(data["masklet"][frame], f"{path} masklet[{frame}]")
        ids = data.get("masklet_id")
        source = f"sa-v {path} annotated frame {frame}"
        if ids is not None:
            source += f" (masklet ids {list(ids)})"
        return masks, [None] * masks.shape[-1], source
    if isinstance(data, list):
        rles = [d.get("segmentation", d) for d in data]
        labels = [d.get("label") or d.get("category") or d.get("name") if "segmentation" in d else None for d in data]
        return _decode_rles(rles, path), labels, f"coco rle {path}"
    raise ValueError(f"{path}: neither an SA-V annotation (with `masklet`) nor a list of COCO RLEs")


def _binary(a: np.ndarray) -> np.ndarray:
    """One mask PNG as bool `[H, W]`: the alpha channel where it is used, else any bright pixel."""
    if a.ndim == 3 and a.shape[-1] == 4:
        return a[..., 3] > 127 if a[..., 3].min() < 255 else a[..., :3].max(-1) > 127
    return (a.max(-1) if a.ndim == 3 else a) > (127 if a.max() > 1 else 0)


def _masks_from_pngs(req: Request) -> Masks:
    """One PNG of object ids (0 background, 1..K), or one binary PNG per object (file name = label)."""
    m = req.masks
    paths = [m] if isinstance(m, str) else list(m)
    arrays = []
    for p in paths:
        if not os.path.exists(p):
            raise FileNotFoundError(f"pipeline: mask {p!r} does not exist (config.sample.masks)")
        arrays.append(np.asarray(Image.open(p)))
    first = arrays[0]
    if len(arrays) == 1 and first.ndim == 2 and first.max() > 1 and len(np.unique(first)) <= 27 and first.max() < 27:
        ids = first.astype(np.int32)
        masks = trajectory_lib.masks_from_ids(ids, int(ids.max()))
        labels, source = [None] * masks.shape[-1], f"id map {paths[0]}"
    else:
        masks = np.stack([_binary(a) for a in arrays], -1)
        labels = [os.path.splitext(os.path.basename(p))[0].replace("_", " ") for p in paths]
        source = "png " + ", ".join(paths)
    return masks, list(req.labels) if req.labels else labels, source


def _read_masks(req: Request, size: tuple[int, int]) -> Masks:
    """The request's masks at the image's size, from whichever source it gives."""
    m = req.masks
    if m is None and req.boxes is None:
        raise ValueError(f"pipeline: request {req.name!r} has neither masks nor boxes; give the first-frame object "
                         f"masks (config.sample.masks) or boxes (config.sample.boxes)")
    if m is None:
        return _masks_from_boxes(req, size)
    if isinstance(m, np.ndarray):
        return m.astype(bool), list(req.labels or [None] * m.shape[-1]), "array"
    if isinstance(m, list) and m and all(isinstance(x, dict) for x in m):
        return _masks_from_inline_rles(req)
    if isinstance(m, str) and (m.endswith(".json") or ".json:" in m):
        return _masks_from_json(m)
    return _masks_from_pngs(req)


def load_masks(req: Request, image_size: tuple[int, int], height: int,
               width: int) -> tuple[np.ndarray, list[str | None], str]:
    """First-frame masks of a request at `[height, width, K]`, their labels and a description of the source."""
    h0, w0 = image_size
    masks, labels, source = _read_masks(req, image_size)
    if masks.shape[:2] != (h0, w0):
        raise ValueError(f"pipeline: masks of request {req.name!r} are {masks.shape[1]}x{masks.shape[0]}, the image "
                         f"is {w0}x{h0}; they must be the first frame's masks at the image's size")
    if labels and len(labels) != masks.shape[-1]:
        raise ValueError(f"pipeline: {len(labels)} labels for {masks.shape[-1]} masks in request {req.name!r}")
    return _resize_masks(masks, height, width), labels, source


def tokenize_prompts(config: ml_collections.ConfigDict, tokenizer: Any, caption: str, motion: str,
                     local: Sequence[str]) -> dict[str, np.ndarray]:
    """Token ids and masks as the training batches hold them (the data loader): caption and motion prompt at
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
