"""First-frame segmentation at generation: boxes -> masks with SAM2, object names -> boxes with Grounding DINO.

TTM's models were trained on SA-V masklets: a box given as a solid rectangle is a shape they never saw. As the paper
does, the first frame is segmented with SAM2 (transformers `Sam2Model`, weights at `config.sample.sam2_path`), one
mask per box, each cropped to its box; when a request gives neither masks nor boxes, Grounding DINO (transformers
`GroundingDinoForObjectDetection`, `config.sample.detector_path`) finds the objects the request names (its labels,
else its local prompts' object phrases, else the offline planner's objects of its caption) and SAM2 segments them.
The chosen masks are drawn over the image (`overlay`) and saved beside the video, `<overlay_dir>/<name>_masks.png`.
`Sam2Video` (transformers `Sam2VideoModel`) tracks boxed objects through a clip; labelling videos for training
(`python -m ttm_jax.data.label`) uses it with `GroundingDino`.

Both models are the optional torch extra (`pip install -e .[torch]`): torch and transformers are imported where they
are used. Pre- and post-processing are written here with numpy and PIL (transformers' SAM2 image processor needs
torchvision, which the extra does not carry): the image resized bilinearly to the model's square input, scaled to
[0, 1] and normalised with the folder's `preprocessor_config.json` mean and std (ImageNet's by default); boxes scaled
from image pixels to that square, x by `S / W` and y by `S / H`; SAM2's low-resolution logits resized bilinearly to
the image and thresholded at 0. Grounding DINO runs through its own processor (PIL backend), and each name's score
for each query is the largest sigmoid of the query's logits over the name's tokens in the prompt `"name 1. name 2."`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
from collections.abc import Sequence

import ml_collections
import numpy as np
from PIL import Image

from ttm_jax.clients.draw import PALETTE, draw_numbered
from ttm_jax.config import ConfigError

BOX_MASKS = ("sam2", "rectangles")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OVERLAY_SUFFIX = "_masks.png"


class SegmentError(ConfigError):
    """Segmentation cannot run as configured (no weights, unreadable weights); the message names the
    `config.sample` field and the fix."""


def _device(device: str | None) -> str:
    import torch  # noqa: PLC0415 - optional heavy dependency

    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def _check_folder(path: str, field: str, what: str, example: str) -> None:
    """`SegmentError` unless `path` is a folder with a `config.json`."""
    fix = (f"download one (e.g. `huggingface-cli download {example} --local-dir DIR`) and set {field}=DIR")
    if not path:
        raise SegmentError(f"{field}: empty, but {what}; {fix}")
    if not os.path.isdir(path) or not os.path.isfile(os.path.join(path, "config.json")):
        raise SegmentError(f"{field}: {path!r} is not a transformers model folder (no config.json); {what}; {fix}")


def box_region(box: Sequence[float], size: tuple[int, int]) -> tuple[slice, slice]:
    """The pixels of `box = [x0, y0, x1, y1]` (image pixels, corners rounded to the pixel grid) in an image of
    `size = (H, W)`: `(rows, cols)` slices, clipped to the image."""
    h, w = size
    x0, y0, x1, y1 = (float(v) for v in box)
    return (slice(max(0, int(round(y0))), min(h, int(round(y1)))),
            slice(max(0, int(round(x0))), min(w, int(round(x1)))))


def box_masks(boxes: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Solid rectangles: bool `[H, W, K]`, one per `[x0, y0, x1, y1]` box of `boxes [K, 4]`."""
    out = np.zeros((*size, len(boxes)), bool)
    for k, box in enumerate(boxes):
        out[box_region(box, size) + (k,)] = True
    return out


def crop_to_boxes(masks: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """`masks bool [H, W, K]` with everything outside box k cleared in mask k; a mask left empty becomes its box's
    rectangle. Returns (masks, the indices that fell back to rectangles)."""
    inside = box_masks(boxes, masks.shape[:2])
    out = masks & inside
    empty = [k for k in range(out.shape[-1]) if not out[..., k].any()]
    for k in empty:
        out[..., k] = inside[..., k]
    return out, empty


def _preprocessor(path: str) -> dict:
    """The image settings saved with a model: `preprocessor_config.json`, or the `image_processor` entry of
    `processor_config.json`; {} when neither is there."""
    for name, key in (("preprocessor_config.json", None), ("processor_config.json", "image_processor")):
        p = os.path.join(path, name)
        if os.path.isfile(p):
            with open(p) as f:
                d = json.load(f)
            d = d.get(key, {}) if key else d
            if d:
                return d
    return {}


class Sam2:
    """SAM2 from a transformers folder: `masks(image, boxes)` -> one mask per box (not yet cropped to it)."""

    def __init__(self, path: str, *, device: str | None = None, field: str = "config.sample.sam2_path"):
        _check_folder(path, field, "boxes are segmented with SAM2 (transformers Sam2Model)",
                      "facebook/sam2.1-hiera-large")
        import torch  # noqa: PLC0415 - optional heavy dependency
        from transformers import Sam2Model  # noqa: PLC0415

        self.device = _device(device)
        try:
            self.model = Sam2Model.from_pretrained(path).to(self.device).eval()
        except (OSError, ValueError, KeyError) as e:
            raise SegmentError(f"{field}: {path!r} does not load as a transformers Sam2Model ({e}); point it at a "
                               f"SAM2 folder such as facebook/sam2.1-hiera-large") from None
        self.size = int(self.model.config.prompt_encoder_config.image_size)
        pre = _preprocessor(path)
        self.mean = np.asarray(pre.get("image_mean", IMAGENET_MEAN), np.float32)
        self.std = np.asarray(pre.get("image_std", IMAGENET_STD), np.float32)
        size = pre.get("size", {})
        if size and (size.get("height"), size.get("width")) != (self.size, self.size):
            raise SegmentError(f"{field}: {path!r} resizes images to {size} but the model takes {self.size}x"
                               f"{self.size} (prompt_encoder_config.image_size); the folder is inconsistent")
        self._torch = torch

    def pixel_values(self, image: np.ndarray) -> np.ndarray:
        """`image uint8 [H, W, 3]` -> float32 `[3, S, S]`: resized bilinearly, in [0, 1], normalised."""
        x = np.asarray(Image.fromarray(image).resize((self.size, self.size), Image.BILINEAR), np.float32) / 255.0
        return ((x - self.mean) / self.std).transpose(2, 0, 1)

    def scale_boxes(self, boxes: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        """`boxes [K, 4]` (x0, y0, x1, y1) in pixels of an image of `size = (H, W)` -> the model's `S x S` input."""
        h, w = size
        return np.asarray(boxes, np.float32) * np.asarray([self.size / w, self.size / h] * 2, np.float32)

    def logits(self, image: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        """float32 `[K, h, w]`: SAM2's low-resolution mask logits, one single-mask output per box."""
        torch = self._torch
        with torch.no_grad():
            out = self.model(pixel_values=torch.from_numpy(self.pixel_values(image))[None].to(self.device),
                             input_boxes=torch.from_numpy(self.scale_boxes(boxes, image.shape[:2]))[None]
                             .to(self.device), multimask_output=False)
        return out.pred_masks[0, :, 0].float().cpu().numpy()

    def masks(self, image: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        """bool `[H, W, K]` at the image's size: the logits resized bilinearly (half-pixel centres), > 0."""
        torch = self._torch
        logits = torch.from_numpy(self.logits(image, boxes))[None]
        up = torch.nn.functional.interpolate(logits, size=image.shape[:2], mode="bilinear", align_corners=False)
        return (up[0] > 0).numpy().transpose(1, 2, 0)


class Sam2Video:
    """SAM2 video propagation from a transformers `Sam2VideoModel` folder: `propagate(frames, boxes)` -> each box's
    object tracked through the frames (the first frame prompted with the boxes)."""

    def __init__(self, path: str, *, device: str | None = None, field: str = "config.sample.sam2_path"):
        _check_folder(path, field, "objects are tracked through the video with SAM2 (transformers Sam2VideoModel)",
                      "facebook/sam2.1-hiera-large")
        import torch  # noqa: PLC0415 - optional heavy dependency
        from transformers import Sam2VideoModel  # noqa: PLC0415

        self.device = _device(device)
        try:
            self.model = Sam2VideoModel.from_pretrained(path).to(self.device).eval()
        except (OSError, ValueError, KeyError) as e:
            raise SegmentError(f"{field}: {path!r} does not load as a transformers Sam2VideoModel ({e}); point it at a "
                               f"SAM2 folder such as facebook/sam2.1-hiera-large") from None
        self.size = int(self.model.config.prompt_encoder_config.image_size)
        pre = _preprocessor(path)
        self.mean = np.asarray(pre.get("image_mean", IMAGENET_MEAN), np.float32)
        self.std = np.asarray(pre.get("image_std", IMAGENET_STD), np.float32)
        self._torch = torch

    def pixel_values(self, frames: np.ndarray) -> np.ndarray:
        """`frames uint8 [T, H, W, 3]` -> float32 `[T, 3, S, S]` (as `Sam2.pixel_values`, frame by frame)."""
        out = np.empty((len(frames), 3, self.size, self.size), np.float32)
        for t, f in enumerate(frames):
            x = np.asarray(Image.fromarray(f).resize((self.size, self.size), Image.BILINEAR), np.float32) / 255.0
            out[t] = ((x - self.mean) / self.std).transpose(2, 0, 1)
        return out

    def propagate(self, frames: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        """bool `[T, H, W, K]`: object k, prompted by `boxes[k]` (x0, y0, x1, y1, image pixels) on frame 0, on every
        frame of `frames uint8 [T, H, W, 3]` (SAM2's low-resolution logits resized bilinearly to H x W, > 0)."""
        torch = self._torch
        from transformers.models.sam2_video.modeling_sam2_video import Sam2VideoInferenceSession  # noqa: PLC0415

        t, h, w = frames.shape[:3]
        boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
        session = Sam2VideoInferenceSession(video=torch.from_numpy(self.pixel_values(frames)), video_height=h,
                                            video_width=w, inference_device=self.device,
                                            video_storage_device=self.device, inference_state_device=self.device,
                                            dtype=torch.float32)
        scaled = boxes * np.asarray([self.size / w, self.size / h] * 2, np.float32)
        ids = list(range(1, len(boxes) + 1))
        for k, obj_id in enumerate(ids):  # a box is the two corner points with labels 2 and 3, as SAM2 encodes it
            session.add_point_inputs(session.obj_id_to_idx(obj_id), 0, {
                "point_coords": torch.from_numpy(scaled[k].reshape(1, 1, 2, 2)).to(self.device),
                "point_labels": torch.tensor([[[2, 3]]], dtype=torch.int32, device=self.device)})
        session.obj_with_new_inputs = ids
        out = np.zeros((t, h, w, len(boxes)), bool)
        with torch.no_grad():
            for step in self.model.propagate_in_video_iterator(session, start_frame_idx=0):
                logits = step.pred_masks[:, 0].float()[None]  # [1, K, h', w']
                up = torch.nn.functional.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
                out[int(step.frame_idx)] = (up[0] > 0).cpu().numpy().transpose(1, 2, 0)
        return out


@dataclasses.dataclass(frozen=True)
class Detection:
    """One named object found by the detector: `box` (x0, y0, x1, y1) in image pixels, its `score` in [0, 1]."""

    name: str
    box: tuple[float, float, float, float]
    score: float


def detector_prompt(names: Sequence[str]) -> tuple[str, list[tuple[int, int]]]:
    """Grounding DINO's text, `"name 1. name 2."` (lower case), and each name's character span in it."""
    text, spans = "", []
    for n in names:
        n = " ".join(n.lower().split()).rstrip(".")
        spans.append((len(text), len(text) + len(n)))
        text += n + ". "
    return text.strip(), spans


def corners(boxes: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """`boxes [..., 4]` (cx, cy, w, h) relative to the image -> (x0, y0, x1, y1) in pixels of `size = (H, W)`,
    clipped to the image."""
    h, w = size
    cx, cy, bw, bh = np.moveaxis(np.asarray(boxes, np.float64), -1, 0)
    out = np.stack([(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h], -1)
    return np.clip(out, 0, [w, h, w, h])


def assign(scores: np.ndarray) -> list[int]:
    """`scores [names, queries]` -> the query of each name: highest score first, each query used once."""
    n, q = scores.shape
    out, used = [-1] * n, set()
    for flat in np.argsort(-scores, axis=None, kind="stable"):
        i, j = divmod(int(flat), q)
        if out[i] < 0 and j not in used:
            out[i] = j
            used.add(j)
    return out


class GroundingDino:
    """Grounding DINO from a transformers folder: `detect(image, names)` -> one `Detection` per name."""

    def __init__(self, path: str, *, device: str | None = None, field: str = "config.sample.detector_path"):
        _check_folder(path, field, "objects given by name (neither masks nor boxes) are found with Grounding DINO "
                      "(transformers GroundingDinoForObjectDetection)", "IDEA-Research/grounding-dino-base")
        import torch  # noqa: PLC0415 - optional heavy dependency
        from transformers import GroundingDinoForObjectDetection, GroundingDinoProcessor  # noqa: PLC0415

        self.device = _device(device)
        try:
            self.model = GroundingDinoForObjectDetection.from_pretrained(path).to(self.device).eval()
            self.processor = GroundingDinoProcessor.from_pretrained(path)
        except (OSError, ValueError, KeyError) as e:
            raise SegmentError(f"{field}: {path!r} does not load as a transformers GroundingDinoForObjectDetection "
                               f"with its processor ({e}); point it at a folder such as "
                               f"IDEA-Research/grounding-dino-base") from None
        self._torch = torch

    def token_spans(self, text: str, spans: Sequence[tuple[int, int]]) -> tuple[list[int], list[list[int]]]:
        """(the prompt's token ids, each name's token positions) from the tokenizer's character offsets."""
        enc = self.processor.tokenizer(text, return_offsets_mapping=True)
        positions = [[t for t, (a, b) in enumerate(enc["offset_mapping"]) if b > a and a < e and b > s]
                     for s, e in spans]
        return list(enc["input_ids"]), positions

    def scores(self, image: np.ndarray, names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(`scores [names, queries]`, `boxes [queries, 4]` (x0, y0, x1, y1) in image pixels) for `image uint8
        [H, W, 3]`."""
        torch = self._torch
        text, spans = detector_prompt(names)
        ids, positions = self.token_spans(text, spans)
        inputs = self.processor(images=Image.fromarray(image), text=text, return_tensors="pt").to(self.device)
        if inputs["input_ids"][0].tolist() != ids:
            raise RuntimeError("segment: the processor tokenized the detector prompt differently from its tokenizer")
        with torch.no_grad():
            out = self.model(**inputs)
        probs = out.logits[0].sigmoid().float().cpu().numpy()  # [Q, max_text_len]
        scores = np.zeros((len(names), probs.shape[0]), np.float32)
        for i, pos in enumerate(positions):
            pos = [p for p in pos if p < probs.shape[1]]
            if pos:
                scores[i] = probs[:, pos].max(axis=1)
        return scores, corners(out.pred_boxes[0].float().cpu().numpy(), image.shape[:2])

    def detect(self, image: np.ndarray, names: Sequence[str]) -> list[Detection]:
        """The best box of each name (each box given to one name at most), with its score."""
        scores, boxes = self.scores(image, names)
        return [Detection(n, tuple(float(v) for v in boxes[j]), float(scores[i, j]))
                for i, (n, j) in enumerate(zip(names, assign(scores), strict=True))]


def overlay(image: np.ndarray, masks: np.ndarray, boxes: np.ndarray | None = None) -> np.ndarray:
    """`image uint8 [H, W, 3]` with `masks bool [H, W, K]` tinted in `PALETTE` (object k+1 in colour k), outlined and
    numbered (`draw.draw_numbered`), each box (if given) drawn as a thin frame of its colour."""
    out = image.astype(np.float32)
    for k in range(masks.shape[-1]):
        colour = np.asarray(PALETTE[k % len(PALETTE)], np.float32)
        out[masks[..., k]] = 0.55 * out[masks[..., k]] + 0.45 * colour
    out = np.clip(np.round(out), 0, 255).astype(np.uint8)
    if boxes is not None:
        for k, box in enumerate(boxes):
            rows, cols = box_region(box, image.shape[:2])
            if rows.stop > rows.start and cols.stop > cols.start:
                colour = PALETTE[k % len(PALETTE)]
                out[rows.start, cols] = out[rows.stop - 1, cols] = colour
                out[rows, cols.start] = out[rows, cols.stop - 1] = colour
    return draw_numbered(out, masks, list(range(1, masks.shape[-1] + 1)))


class Segmenter:
    """The segmentation of generation requests (`from_config(config.sample)`); models load on first use, once.

    Args:
      sam2_path: SAM2 folder (boxes -> masks); empty: boxes are an error naming `config.sample.sam2_path`.
      box_masks: `sam2`, or `rectangles`: boxes (given or detected) become solid rectangles, no SAM2.
      detector_path: Grounding DINO folder (names -> boxes); empty: a request without masks or boxes is an error.
      threshold: a name whose best box scores below this is not found (`config.sample.detector_threshold`).
      overlay_dir: where `<name>_masks.png` goes (the sample's workdir, beside the video); empty: no file.
    """

    def __init__(self, sam2_path: str = "", detector_path: str = "", *, box_masks: str = "sam2",
                 threshold: float = 0.3, overlay_dir: str = "", device: str | None = None):
        if box_masks not in BOX_MASKS:
            raise SegmentError(f"config.sample.box_masks: {box_masks!r}; choose one of {BOX_MASKS} (sam2: boxes are "
                               f"segmented with SAM2 at config.sample.sam2_path; rectangles: boxes are used as solid "
                               f"masks)")
        self.sam2_path, self.detector_path, self.threshold = sam2_path, detector_path, float(threshold)
        self.box_masks = box_masks
        self.overlay_dir, self.device = overlay_dir, device
        self._sam2: Sam2 | None = None
        self._detector: GroundingDino | None = None
        self._lock = threading.Lock()

    @property
    def sam2(self) -> Sam2:
        with self._lock:
            if self._sam2 is None:
                self._sam2 = Sam2(self.sam2_path, device=self.device)
            return self._sam2

    @property
    def detector(self) -> GroundingDino:
        with self._lock:
            if self._detector is None:
                self._detector = GroundingDino(self.detector_path, device=self.device)
            return self._detector

    def masks_from_boxes(self, image: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, list[int]]:
        """(bool `[H, W, K]`: SAM2's mask of each box cropped to it, the boxes whose mask was empty and became
        rectangles); with `box_masks="rectangles"` every box is its rectangle."""
        boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
        if self.box_masks == "rectangles":
            return box_masks(boxes, image.shape[:2]), list(range(len(boxes)))
        return crop_to_boxes(self.sam2.masks(image, boxes), boxes)

    def boxes_from_names(self, image: np.ndarray, names: Sequence[str]) -> list[Detection]:
        """One `Detection` per name (`GroundingDino.detect`), whatever its score (the caller checks `threshold`)."""
        return self.detector.detect(image, names)

    def save_overlay(self, name: str, image: np.ndarray, masks: np.ndarray, boxes: np.ndarray | None = None) -> str:
        """`<overlay_dir>/<name>_masks.png` (`overlay`); returns its path, "" without an `overlay_dir`."""
        if not self.overlay_dir:
            return ""
        os.makedirs(self.overlay_dir, exist_ok=True)
        path = os.path.join(self.overlay_dir, name + OVERLAY_SUFFIX)
        Image.fromarray(overlay(image, masks, boxes=boxes)).save(path)
        return path


def from_config(sample: ml_collections.ConfigDict, *, overlay_dir: str = "") -> Segmenter | None:
    """The segmenter `config.sample` asks for (`box_masks`: auto = SAM2 when `sam2_path` is set, else rectangles):
    None when boxes stay rectangles and no detector is set (the requests are read as before)."""
    mode, detector = sample.get("box_masks", "auto"), sample.get("detector_path", "")
    if mode not in ("auto", "sam2", "rectangles"):
        raise SegmentError(f"config.sample.box_masks: {mode!r}; choose auto, sam2 or rectangles")
    if mode == "auto":  # SAM2 when its weights are given, else the boxes stay rectangles (as before SAM2 existed)
        mode = "sam2" if sample.get("sam2_path", "") else "rectangles"
    if mode == "rectangles" and not detector:
        return None
    return Segmenter(sample.get("sam2_path", ""), detector, box_masks=mode,
                     threshold=float(sample.get("detector_threshold", 0.3)), overlay_dir=overlay_dir)
