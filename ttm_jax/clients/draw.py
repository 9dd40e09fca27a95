"""Numbered outlines: each object's mask outlined in its colour and its number written on a box of that colour, where
it fits inside the mask or just outside it. What the captioning VLM sees (`data/caption`) and the overlay a segmenter
writes for the user to check (`clients/segment.overlay`). Layer 1: imports nothing of ours.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

# the numbered outlines' colours (distinct, saturated; the number is written on a box of the same colour)
PALETTE = ((230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255),
           (170, 110, 40), (255, 250, 200), (128, 0, 0), (170, 255, 195), (128, 128, 0), (255, 215, 180),
           (0, 0, 128), (255, 255, 255))


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def label_point(mask: np.ndarray) -> tuple[int, int, float]:
    """(y, x, distance) of the pixel of `mask bool [H, W]` farthest from its edge: where its number goes when it
    fits inside."""
    dist = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return int(y), int(x), float(dist[y, x])


def label_box(mask: np.ndarray, size: tuple[int, int]) -> tuple[int, int]:
    """Top-left (x0, y0) of a `size = (w, h)` label for `mask bool [H, W]`: centred on its `label_point` when the
    label fits inside the mask, else just above its bounding box (below when there is no room above), so a small
    object stays visible; always inside the image."""
    h_img, w_img = mask.shape
    tw, th = size
    y, x, dist = label_point(mask)
    if dist >= max(tw, th) / 2 + 1:
        x0, y0 = x - tw // 2, y - th // 2
    else:
        ys, xs = np.nonzero(mask)
        x0 = int(xs.min() + xs.max()) // 2 - tw // 2
        y0 = int(ys.min()) - th - 1 if ys.min() - th - 1 >= 0 else int(ys.max()) + 2
    return int(np.clip(x0, 0, max(0, w_img - tw))), int(np.clip(y0, 0, max(0, h_img - th)))


def draw_numbered(image: np.ndarray, masks: np.ndarray, numbers: Sequence[int]) -> np.ndarray:
    """`image uint8 [H, W, 3]` with each of `masks bool [H, W, len(numbers)]` outlined in `PALETTE[number - 1]` and
    its number written on a box of that colour (`label_box`); empty masks are not drawn."""
    h, w = image.shape[:2]
    out = image.copy()
    thickness = max(1, round(min(h, w) / 160))
    visible = [(j, n) for j, n in enumerate(numbers) if masks[..., j].any()]
    for j, n in visible:
        m = masks[..., j]
        edge = m & ~ndimage.binary_erosion(m, iterations=thickness, border_value=0)
        out[edge] = PALETTE[(n - 1) % len(PALETTE)]
    pil = Image.fromarray(out)
    draw = ImageDraw.Draw(pil)
    font = _font(max(10, min(h, w) // 14))
    for j, n in visible:
        colour = PALETTE[(n - 1) % len(PALETTE)]
        left, top, right, bottom = draw.textbbox((0, 0), str(n), font=font)
        tw, th = right - left + 4, bottom - top + 4
        x0, y0 = label_box(masks[..., j], (tw, th))
        draw.rectangle((x0, y0, x0 + tw - 1, y0 + th - 1), fill=colour)
        ink = (0, 0, 0) if sum(colour) > 382 else (255, 255, 255)
        draw.text((x0 + 2 - left, y0 + 2 - top), str(n), fill=ink, font=font)
    return np.asarray(pil)
