"""Generation requests: what to generate (image, caption, first-frame masks or boxes), read from JSONL or the
config, and the inputs they name loaded at the stages' resolution (image resized bilinearly, masks by nearest
neighbour), with the prompts tokenized as the training batches hold them.

Masks come in many forms (`load_masks`): a list of per-object PNGs (file name = label), one PNG of object ids, an
SA-V annotation json (`path.json[:frame]`), a json of COCO RLEs, inline RLEs, a bool array, or boxes. Given a
`segment.Segmenter` (`segment.from_config(config.sample)`), boxes are segmented with SAM2 (each mask cropped to its
box) and a request with neither masks nor boxes has its objects found by name with Grounding DINO (names: its labels,
else its local prompts' object phrases, else the offline planner's objects of its caption), the overlay of the chosen
masks saved as `<name>_masks.png` and named in the mask-source description; without one, boxes are solid rectangles.
Every error names the request, the file and the fix.

`load_inputs` checks one request against the trained models (image readable, masks of the image's size, at most
`data.max_objects` objects, local prompts one per mask) and fits it to their frame: an image of another aspect ratio is
centre-cropped as training crops clips (`clips.crop_box`, `data.crop="center"`), its masks with the same box, and the
crop is reported (`Inputs.crop_note`). `read_request_lines` reads a JSONL leniently (a bad line is a `RequestLine`
with its `error`); `read_requests` is the strict reader.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from fractions import Fraction
from typing import Any

import ml_collections
import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from ttm_jax.clients import segment
from ttm_jax.config import ConfigError
from ttm_jax.data import clips, loader, prompt_plan
from ttm_jax.data import trajectory as trajectory_lib

CONFIG_SOURCE = "config.sample"  # `Request.source` of the one request the sample config describes


class RequestError(ConfigError):
    """A request that cannot be generated (a user error, hence a `ConfigError`). The message names the request (its
    name and JSONL line, or the `config.sample` field), the file or field at fault, and the fix."""


@dataclasses.dataclass
class Request:
    """One video to generate.

    image: path (PNG/JPEG, any size; fitted to the stage configs' data.height x data.width: centre-cropped to their
      aspect ratio, then resized) or uint8 `[H, W, 3]`.
    masks: first-frame object masks, one of: a list of PNG paths (one binary mask per object; the file name is the
      object's label), one PNG of object ids (0 background, 1..K), an SA-V annotation json (`path.json` or
      `path.json:i` for annotated frame i, default 0), a json of COCO RLEs (a list of `{"size", "counts"}` or of
      `{"segmentation": rle, "label": ...}`), the same list inline, or a bool array `[H, W, K]`.
    boxes: `[[x0, y0, x1, y1], ...]` in the input image's pixels (used when there are no masks).
    labels: object labels (for boxes or arrays), matched to the local prompts' object phrases.
    motion_prompt / local_prompts: skip planning and use these (local prompts in mask order).
    source: where the request came from, for messages: `"<jsonl path>:<line>"`, `CONFIG_SOURCE`, or empty (not a
      JSON key).
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
    source: str = dataclasses.field(default="", compare=False)

    @classmethod
    def from_json(cls, d: dict, *, base_dir: str = "", where: str = "request") -> Request:
        """A JSONL line: `{"image", "caption", "masks"?, "boxes"?, "labels"?, "motion_prompt"?, "local_prompts"?,
        "seed"?, "name"?}`; relative paths are read from `base_dir`. `where` (e.g. `"r.jsonl:3"`) becomes `source`."""
        if not isinstance(d, dict):
            raise RequestError(f"{where}: a {type(d).__name__}, not a JSON object; write one request object per line, "
                               f'e.g. {{"image": "frame.png", "caption": "...", "masks": ["obj.png"]}}')
        unknown = set(d) - set(JSON_KEYS)
        if unknown:
            raise RequestError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: {list(JSON_KEYS)}")
        for key in ("image", "caption"):
            if not d.get(key):
                raise RequestError(f"{where}: `{key}` is required")
            if not isinstance(d[key], str):
                raise RequestError(f"{where}: `{key}` is a {type(d[key]).__name__}; give a string")
        try:
            seed = int(d.get("seed", 0))
        except (TypeError, ValueError):
            raise RequestError(f"{where}: `seed` {d['seed']!r} is not an integer") from None

        def rel(p):
            return p if not isinstance(p, str) or os.path.isabs(p) or not base_dir else os.path.join(base_dir, p)

        masks = d.get("masks")
        if isinstance(masks, str):
            masks = rel(masks)
        elif isinstance(masks, list) and masks and isinstance(masks[0], str):
            masks = [rel(m) for m in masks]
        return cls(image=rel(d["image"]), caption=d["caption"], masks=masks, boxes=d.get("boxes"),
                   labels=d.get("labels"), motion_prompt=d.get("motion_prompt"), local_prompts=d.get("local_prompts"),
                   seed=seed, name=str(d.get("name", "sample")), source=where)


JSON_KEYS = tuple(f.name for f in dataclasses.fields(Request) if f.name != "source")


def field_name(req: Request, field: str) -> str:
    """How messages name a request's field: `config.sample.<field>` for the config's request, else
    `request '<name>' (<jsonl>:<line>) `<field>``."""
    if req.source == CONFIG_SOURCE:
        return f"{CONFIG_SOURCE}.{field}"
    return f"request {req.name!r}{f' ({req.source})' if req.source else ''} `{field}`"


@dataclasses.dataclass
class RequestLine:
    """One request line of a JSONL: the request, or `error` saying why the line is not one."""

    source: str  # "<path>:<line>"
    line: int
    name: str  # the line's `name`, else "<jsonl stem>_<line:04d>"
    request: Request | None
    error: str | None = None


def _parse_lines(path: str) -> list[RequestLine]:
    """Every non-blank, non-comment line of a JSONL, parsed; no check across lines."""
    out = []
    base = os.path.dirname(os.path.abspath(path))
    stem = os.path.splitext(os.path.basename(path))[0]
    with open(path) as f:
        for i, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            where, default = f"{path}:{i}", f"{stem}_{i:04d}"
            try:
                d = json.loads(line)
            except json.JSONDecodeError as e:
                out.append(RequestLine(where, i, default, None, f"{where}: not JSON ({e}); fix the line or remove it"))
                continue
            name = str(d.get("name", default)) if isinstance(d, dict) else default
            try:
                r = Request.from_json(d, base_dir=base, where=where)
            except RequestError as e:
                out.append(RequestLine(where, i, name, None, str(e)))
                continue
            r.name = name
            out.append(RequestLine(where, i, name, r))
    return out


def read_request_lines(path: str) -> list[RequestLine]:
    """The lenient reader: every request line of a JSONL, a bad one (not JSON, not a request, a `name` an earlier line
    already uses) with its `error` instead of a request. Blank lines and `#` comments are skipped."""
    out = _parse_lines(path)
    first: dict[str, int] = {}
    for r in out:
        if r.name in first:
            r.request, r.error = None, (f"{r.source}: name {r.name!r} is already used by line {first[r.name]}; give "
                                        f"each line a distinct `name`")
        else:
            first[r.name] = r.line
    return out


def read_requests(path: str) -> list[Request]:
    """The strict reader: requests from a JSONL file (one object per line; blank lines and `#` comments skipped);
    raises `RequestError` on the first bad line, on repeated names and on a file with no request."""
    lines = _parse_lines(path)
    for r in lines:
        if r.error:
            raise RequestError(r.error)
    if not lines:
        raise RequestError(f"{path}: no requests (config.sample.requests)")
    names = [r.name for r in lines]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise RequestError(f"{path}: request names {dup} repeat; give each line a distinct `name`")
    return [r.request for r in lines]


def _size(h: int, w: int) -> str:
    """`WxH (aspect a:b)`."""
    ratio = Fraction(w, h).limit_denominator(32)
    return f"{w}x{h} (aspect {ratio.numerator}:{ratio.denominator})"


def fit_box(size: tuple[int, int], height: int, width: int) -> tuple[float, float, float, float] | None:
    """The centre crop, `(left, top, right, bottom)` in source pixels, that training's `clips.crop_box` takes from a
    frame of `size = (H, W)` for `height x width` clips; None when the aspect ratios agree (the whole frame, within
    half a pixel)."""
    h0, w0 = size
    box = clips.crop_box(h0, w0, height, width, mode="center")
    if box[0] < 0.5 and box[1] < 0.5:
        return None
    return box


def crop_note(size: tuple[int, int], height: int, width: int) -> str:
    """What `fit_box` does to a frame of `size = (H, W)`, in words (empty when it takes the whole frame)."""
    box = fit_box(size, height, width)
    if box is None:
        return ""
    return (f"image {_size(*size)} centre-cropped to box [{', '.join(f'{v:g}' for v in box)}] (left, top, right, "
            f"bottom) to the models' {_size(height, width)}, as training crops clips (data.crop=center); the masks "
            f"are cropped the same; crop the image yourself to choose another part")


def _read_image(image: Any, where: str) -> np.ndarray:
    """uint8 `[H, W, 3]` of an image path or array; `RequestError` naming `where` for a missing or unreadable file."""
    if isinstance(image, (str, os.PathLike)):
        if not os.path.isfile(image):
            raise RequestError(f"{where}: {str(image)!r} does not exist; give the first frame as a PNG or JPEG")
        try:
            with Image.open(image) as pil:
                return np.asarray(pil.convert("RGB"), np.uint8)
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise RequestError(f"{where}: {str(image)!r} is not an image PIL can read ({e}); give the first frame "
                               f"as a PNG or JPEG") from None
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise RequestError(f"{where}: an image array must be uint8 [H, W, 3], got {arr.shape}")
    return arr.astype(np.uint8)


def load_image(image: Any, height: int, width: int, *,
               where: str = f"{CONFIG_SOURCE}.image") -> tuple[np.ndarray, tuple[int, int]]:
    """`(uint8 [height, width, 3], (original H, original W))`: the centre crop of the models' aspect ratio
    (`fit_box`, as training crops clips), resized bilinearly (antialiased, as `clips.resize_frames`). Raises
    `RequestError` naming `where` for a missing file or one that is not an image."""
    arr = _read_image(image, where)
    size = arr.shape[:2]
    if size == (height, width):
        return arr, size
    box = fit_box(size, height, width) or (0.0, 0.0, float(size[1]), float(size[0]))
    return clips.resize_frames(arr[None], box, (height, width))[0], size


def _resize_masks(masks: np.ndarray, height: int, width: int,
                  box: tuple[float, float, float, float] | None = None) -> np.ndarray:
    """bool `[h, w, K]` -> bool `[height, width, K]`: the crop `box` (default the whole frame) resized by nearest
    neighbour (each output pixel takes the source pixel under its centre)."""
    h, w = masks.shape[:2]
    if box is None and (h, w) == (height, width):
        return masks.astype(bool)
    left, top, right, bottom = box or (0.0, 0.0, float(w), float(h))
    ys = np.clip(np.floor(top + (np.arange(height) + 0.5) * (bottom - top) / height), 0, h - 1).astype(int)
    xs = np.clip(np.floor(left + (np.arange(width) + 0.5) * (right - left) / width), 0, w - 1).astype(int)
    return masks[ys][:, xs].astype(bool)


def _decode_rles(rles: list, where: str) -> np.ndarray:
    """COCO RLEs (compressed, string or uncompressed counts) -> bool `[h, w, K]`."""
    fixed = []
    for i, r in enumerate(rles):
        if not isinstance(r, dict) or "size" not in r or "counts" not in r:
            raise RequestError(f"{where}: entry {i} is not a COCO RLE {{'size': [h, w], 'counts': ...}}")
        if isinstance(r["counts"], list):  # uncompressed RLE
            r = mask_utils.frPyObjects(r, *r["size"])
        elif isinstance(r["counts"], str):
            r = {"size": r["size"], "counts": r["counts"].encode()}
        fixed.append(r)
    if not fixed:
        raise RequestError(f"{where}: no RLE; give one per object")
    sizes = {tuple(r["size"]) for r in fixed}
    if len(sizes) > 1:
        raise RequestError(f"{where}: RLEs of different sizes {sorted(sizes)} (h, w); every object's RLE must be at "
                           f"the image's size")
    return mask_utils.decode(fixed).astype(bool).reshape(*fixed[0]["size"], len(fixed))


# Each mask source: `(request, (H, W) of the image) -> (bool [H, W, K], labels, description of the source)`.
Masks = tuple[np.ndarray, list, str]


def _boxes(req: Request, size: tuple[int, int]) -> np.ndarray:
    """The request's boxes, float `[K, 4]` (x0, y0, x1, y1) in image pixels, each checked to lie inside the image."""
    h0, w0 = size
    where = field_name(req, "boxes")
    try:
        boxes = np.asarray(req.boxes, np.float64).reshape(-1, 4)
    except (TypeError, ValueError):
        raise RequestError(f"{where}: {req.boxes!r} is not a list of [x0, y0, x1, y1] boxes in image pixels") from None
    for k, (x0, y0, x1, y1) in enumerate(boxes):
        if not (0 <= x0 < x1 <= w0 and 0 <= y0 < y1 <= h0):
            raise RequestError(f"{where}: box {k} {[x0, y0, x1, y1]} is not inside the {w0}x{h0} image as "
                               f"[x0, y0, x1, y1] with x0 < x1, y0 < y1")
    return boxes


def _masks_from_boxes(req: Request, size: tuple[int, int]) -> Masks:
    """Solid rectangles, one per `[x0, y0, x1, y1]` box in image pixels."""
    boxes = _boxes(req, size)
    return segment.box_masks(boxes, size), list(req.labels or [None] * len(boxes)), "boxes"


def _segmented(req: Request, image: np.ndarray, boxes: np.ndarray, segmenter: segment.Segmenter,
               found: str) -> tuple[np.ndarray, str]:
    """SAM2's masks of `boxes` (cropped to them; `segmenter.box_masks="rectangles"`: the rectangles), the overlay
    saved, and the source description: `found` (where the boxes came from), the model, fallbacks, the overlay path."""
    masks, rectangles = segmenter.masks_from_boxes(image, boxes)
    shown = [[round(float(v), 1) for v in b] for b in boxes]
    if segmenter.box_masks == "rectangles":
        source = f"{found} {shown} as rectangles (config.sample.box_masks=rectangles)"
    else:
        source = f"sam2 {segmenter.sam2_path} masks of {found} {shown}, each cropped to its box"
        if rectangles:
            source += f"; SAM2 found nothing in box(es) {[k + 1 for k in rectangles]}: kept as rectangles"
    path = segmenter.save_overlay(req.name, image, masks, boxes)
    return masks, source + (f"; overlay {path}" if path else "")


def object_names(req: Request) -> list[str]:
    """What a request without masks or boxes asks the detector to find: its labels, else the object phrases of its
    local prompts, else the objects the offline planner reads from its caption."""
    if req.labels:
        return [str(n) for n in req.labels]
    if req.local_prompts:
        return [prompt_plan.object_phrase(p) for p in req.local_prompts]
    try:
        return prompt_plan.plan_offline(req.caption).objects
    except prompt_plan.PlanningError as e:
        raise RequestError(f"{field_name(req, 'labels')}: the objects to find are not given and the caption cannot be "
                           f"split into objects ({e}); name them in labels (config.sample.labels='red square,blue "
                           f"disc'), or give boxes or masks") from None


def _masks_from_names(req: Request, image: np.ndarray, segmenter: segment.Segmenter) -> Masks:
    """Grounding DINO's best box for each of `object_names(req)`, then `_segmented`; a name whose best box scores
    below `segmenter.threshold` (or has no area) is a `RequestError`."""
    names = object_names(req)
    found = segmenter.boxes_from_names(image, names)
    size = image.shape[:2]
    missing = [d for d in found if d.score < segmenter.threshold or not segment.box_masks(
        np.asarray([d.box]), size).any()]
    if missing:
        which = ", ".join(f"{d.name!r} (best score {d.score:.2f})" for d in missing)
        raise RequestError(f"{field_name(req, 'masks')}: Grounding DINO ({segmenter.detector_path}) found no {which} "
                           f"at config.sample.detector_threshold={segmenter.threshold:g}; give boxes or masks for "
                           f"them, name them as the image shows them (labels), or lower the threshold")
    boxes = np.asarray([d.box for d in found], np.float64)
    masks, source = _segmented(req, image, boxes, segmenter,
                               "grounding dino " + segmenter.detector_path + " boxes of " + repr(names))
    return masks, list(names), source


def _masks_from_inline_rles(req: Request) -> Masks:
    """A JSONL request's inline COCO RLEs (`{"size", "counts"}` or `{"segmentation": rle, "label": ...}`)."""
    m = req.masks
    masks = _decode_rles([x.get("segmentation", x) for x in m], field_name(req, "masks"))
    labels = list(req.labels or [x.get("label") if "segmentation" in x else None for x in m])
    return masks, labels, "inline coco rle"


def _masks_from_json(req: Request, spec: str) -> Masks:
    """`path.json[:frame]`: an SA-V annotation (annotated frame `frame`, default 0) or a json list of COCO RLEs."""
    path, _, frame = spec.partition(".json")
    path += ".json"
    where = f"{field_name(req, 'masks')}: {path}"
    try:
        frame = int(frame[1:]) if frame.startswith(":") else 0
    except ValueError:
        raise RequestError(f"{where}: {spec!r} is not `path.json` or `path.json:<annotated frame>`") from None
    if not os.path.isfile(path):
        raise RequestError(f"{where} does not exist; give an SA-V annotation or a COCO RLE json")
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RequestError(f"{where}: not readable JSON ({e}); give an SA-V annotation or a COCO RLE json") from None
    if isinstance(data, dict) and "masklet" in data:  # SA-V annotation
        if not 0 <= frame < len(data["masklet"]):
            raise RequestError(f"{where}: annotated frame {frame} out of range [0, {len(data['masklet'])}); "
                               f"give `{path}:<i>` with i in range")
        masks = _decode_rles(data["masklet"][frame], f"{where} masklet[{frame}]")
        ids = data.get("masklet_id")
        source = f"sa-v {path} annotated frame {frame}"
        if ids is not None:
            source += f" (masklet ids {list(ids)})"
        return masks, [None] * masks.shape[-1], source
    if isinstance(data, list):
        rles = [d.get("segmentation", d) if isinstance(d, dict) else d for d in data]
        labels = [d.get("label") or d.get("category") or d.get("name") if isinstance(d, dict) and "segmentation" in d
                  else None for d in data]
        return _decode_rles(rles, where), labels, f"coco rle {path}"
    raise RequestError(f"{where}: neither an SA-V annotation (with `masklet`) nor a list of COCO RLEs")


def _binary(a: np.ndarray) -> np.ndarray:
    """One mask PNG as bool `[H, W]`: the alpha channel where it is used, else any bright pixel."""
    if a.ndim == 3 and a.shape[-1] == 4:
        return a[..., 3] > 127 if a[..., 3].min() < 255 else a[..., :3].max(-1) > 127
    return (a.max(-1) if a.ndim == 3 else a) > (127 if a.max() > 1 else 0)


def _masks_from_pngs(req: Request, size: tuple[int, int]) -> Masks:
    """One PNG of object ids (0 background, 1..K), or one binary PNG per object (file name = label); every PNG at the
    image's `size = (H, W)`."""
    m = req.masks
    where = field_name(req, "masks")
    paths = [m] if isinstance(m, (str, os.PathLike)) else list(m)
    if not paths or not all(isinstance(p, (str, os.PathLike)) for p in paths):
        raise RequestError(f"{where}: {m!r} is not a mask file or a list of mask PNG files")
    arrays = []
    for p in paths:
        if not os.path.isfile(p):
            raise RequestError(f"{where}: mask {str(p)!r} does not exist; give one PNG per object (or an id map, an "
                               f"SA-V json, a COCO RLE json)")
        try:
            with Image.open(p) as pil:
                arrays.append(np.asarray(pil))
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise RequestError(f"{where}: mask {str(p)!r} is not an image PIL can read ({e}); give a PNG") from None
    h0, w0 = size
    wrong = [i for i, a in enumerate(arrays) if a.shape[:2] != (h0, w0)]
    if wrong:
        i = wrong[0]
        fine = [os.path.basename(paths[j]) for j in range(len(paths)) if j not in wrong]
        others = f" (as are {', '.join(fine)})" if fine else ""
        h, w = arrays[i].shape[:2]
        raise RequestError(f"{where}: mask {str(paths[i])!r} is {w}x{h} (WxH) but the image is {w0}x{h0}{others}; "
                           f"every mask must be the first frame's mask at the image's size: resize "
                           f"{os.path.basename(paths[i])} to {w0}x{h0} (nearest neighbour)")
    first = arrays[0]
    if len(arrays) == 1 and first.ndim == 2 and first.max() > 1 and len(np.unique(first)) <= 27 and first.max() < 27:
        ids = first.astype(np.int32)
        masks = trajectory_lib.masks_from_ids(ids, int(ids.max()))
        labels, source = [None] * masks.shape[-1], f"id map {paths[0]}"
    else:
        masks = np.stack([_binary(a) for a in arrays], -1)
        labels = [os.path.splitext(os.path.basename(p))[0].replace("_", " ") for p in paths]
        source = "png " + ", ".join(str(p) for p in paths)
    return masks, list(req.labels) if req.labels else labels, source


def _read_masks(req: Request, size: tuple[int, int], segmenter: segment.Segmenter | None = None,
                image: np.ndarray | None = None) -> Masks:
    """The request's masks at the image's size, from whichever source it gives (boxes, or names, through the
    `segmenter` when given: `image` is then the request's image, uint8 `[H, W, 3]`)."""
    m = req.masks
    if m is None and req.boxes is None:
        if segmenter is not None and segmenter.detector_path:
            return _masks_from_names(req, _image_for(req, image), segmenter)
        raise RequestError(f"{field_name(req, 'masks')}: the request has neither masks nor boxes; give the "
                           f"first-frame object masks (config.sample.masks) or boxes (config.sample.boxes), or set "
                           f"config.sample.detector_path to find the objects by name")
    if m is None:
        if segmenter is not None:
            boxes = _boxes(req, size)
            masks, source = _segmented(req, _image_for(req, image), boxes, segmenter, "boxes")
            return masks, list(req.labels or [None] * len(boxes)), source
        return _masks_from_boxes(req, size)
    if isinstance(m, np.ndarray):
        if m.ndim != 3:
            raise RequestError(f"{field_name(req, 'masks')}: a mask array must be bool [H, W, K], got {m.shape}")
        return m.astype(bool), list(req.labels or [None] * m.shape[-1]), "array"
    if isinstance(m, list) and m and all(isinstance(x, dict) for x in m):
        return _masks_from_inline_rles(req)
    if isinstance(m, str) and (m.endswith(".json") or ".json:" in m):
        return _masks_from_json(req, m)
    return _masks_from_pngs(req, size)


def _image_for(req: Request, image: np.ndarray | None) -> np.ndarray:
    return image if image is not None else _read_image(req.image, field_name(req, "image"))


def load_masks(req: Request, image_size: tuple[int, int], height: int, width: int, *,
               segmenter: segment.Segmenter | None = None,
               image: np.ndarray | None = None) -> tuple[np.ndarray, list[str | None], str]:
    """First-frame masks of a request at `[height, width, K]`, their labels and a description of the source. The
    masks are cropped with the image's box (`fit_box`: the centre crop of the models' aspect ratio) and resized by
    nearest neighbour. `segmenter`: boxes -> SAM2 masks, names -> Grounding DINO boxes (module docstring); `image`:
    the request's image at `image_size` (read from the request when None and needed). Raises `RequestError` naming
    the request, the file and the fix (`segment.SegmentError` for weights that are not set or do not load)."""
    h0, w0 = image_size
    masks, labels, source = _read_masks(req, image_size, segmenter, image)
    if masks.shape[:2] != (h0, w0):
        raise RequestError(f"{field_name(req, 'masks')}: the masks are {masks.shape[1]}x{masks.shape[0]}, the image "
                           f"is {w0}x{h0}; they must be the first frame's masks at the image's size")
    if labels and len(labels) != masks.shape[-1]:
        raise RequestError(f"{field_name(req, 'labels')}: {len(labels)} labels for {masks.shape[-1]} masks; give "
                           f"one label per mask")
    box = fit_box(image_size, height, width)
    out = _resize_masks(masks, height, width, box)
    lost = [k for k in range(masks.shape[-1]) if masks[..., k].any() and not out[..., k].any()]
    if lost:
        names = ", ".join(f"{k + 1}" + (f" ({labels[k]})" if labels and labels[k] else "") for k in lost)
        how = (f"lie outside the centre crop [{', '.join(f'{v:g}' for v in box)}] (left, top, right, bottom) of the "
               f"{w0}x{h0} image" if box is not None else f"are too small to survive the resize to {width}x{height}")
        raise RequestError(f"{field_name(req, 'masks')}: object(s) {names} {how}; crop the image (and its masks) "
                           f"yourself to keep them, or drop those masks")
    return out, labels, source


@dataclasses.dataclass
class Inputs:
    """A request's image and first-frame masks, checked and fitted to the models' frame (`load_inputs`)."""

    image: np.ndarray  # uint8 [H, W, 3] at the models' data.height x data.width
    masks: np.ndarray  # bool [H, W, K], in object-id order
    labels: list[str | None]
    mask_source: str
    size: tuple[int, int]  # the input image's (H, W)
    crop: tuple[float, float, float, float] | None  # (left, top, right, bottom) in input pixels; None: whole image
    crop_note: str  # the crop in words ("" without one)

    def crop_json(self) -> dict | None:
        """The crop as the per-request JSON record holds it (None without one)."""
        if self.crop is None:
            return None
        return {"image_size": [self.size[1], self.size[0]], "box": [round(v, 3) for v in self.crop],
                "note": self.crop_note}


def load_inputs(req: Request, height: int, width: int, max_objects: int, *,
                models: str = "the stage models", segmenter: segment.Segmenter | None = None) -> Inputs:
    """Check a request against models of `height x width` frames taking at most `max_objects` objects, and load its
    image and masks fitted to them (`load_image`, `load_masks`), without any model. Raises `RequestError` naming the
    request, the file or field, and the fix: a missing or unreadable image or mask, a mask of another size than the
    image, more objects than `max_objects`, labels or local prompts not one per mask. `models` names where
    `max_objects` comes from, for the message. `segmenter`: see `load_masks`."""
    original = _read_image(req.image, field_name(req, "image"))
    image, size = load_image(original, height, width, where=field_name(req, "image"))
    masks, labels, source = load_masks(req, size, height, width, segmenter=segmenter, image=original)
    k = masks.shape[-1]
    if k > max_objects:
        raise RequestError(f"{field_name(req, 'masks')}: {k} objects ({source}), but {models} take at most "
                           f"data.max_objects={max_objects}; give at most {max_objects} masks (merge or drop objects)")
    if req.local_prompts is not None and len(req.local_prompts) != k:
        raise RequestError(f"{field_name(req, 'local_prompts')}: {len(req.local_prompts)} local prompts for {k} "
                           f"masks; give one per mask, in mask order")
    return Inputs(image, masks, labels, source, size, fit_box(size, height, width), crop_note(size, height, width))

def tokenize_prompts(config: ml_collections.ConfigDict, tokenizer: Any, caption: str, motion: str,
                     local: Sequence[str]) -> dict[str, np.ndarray]:
    """Token ids and masks as the training batches hold them (`data.loader.tokenize_prompts`, the local prompts padded
    to `data.max_objects` slots): caption and motion prompt at `max_length`; local slots `[K+1, Lp]`, slot 0 the
    caption, slot k the local prompt of object k, an empty prompt with no tokens at all (mask all False)."""
    t, k = config.text_encoder, int(config.data.max_objects)
    if len(local) > k:
        raise ValueError(f"pipeline: {len(local)} objects but the stage-{config.stage} model takes at most "
                         f"data.max_objects={k}; give fewer masks")
    return loader.tokenize_prompts(tokenizer, caption, motion, [*local, *[""] * (k - len(local))],
                                   max_length=int(t.max_length), local_max_length=int(t.local_max_length))
