"""Prompt planning at generation: caption -> motion prompt + one local prompt per object, and local prompts ->
first-frame masks.

The planning itself (the two few-shot templates, the tolerant answer parsers, `plan_with_llm`, `plan_offline`,
`Plan`) lives in `ttm_jax.data.prompt_plan`, one layer down, because captioning SA-V for training
(`ttm_jax.data.caption`) uses the same templates; this module re-exports those names, so `prompts.plan_offline` and
friends are unchanged, and adds
- `match_prompts_to_masks`: which local prompt belongs to which first-frame mask, by the masks' labels, by the named
  colours against the image, or by order; the result says which rule it used, and the pipeline writes it to its JSON.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from collections.abc import Sequence

import numpy as np

from ttm_jax.data.prompt_plan import (
    APPEARANCE_WORDS,
    DETERMINERS,
    LOCAL_EXAMPLES,
    LOCAL_SYSTEM,
    MOTION_EXAMPLES,
    MOTION_SYSTEM,
    MOTION_VERBS,
    MOTION_VERBS_PLURAL,
    Plan,
    PlanningError,
    PromptParseError,
    format_local_answer,
    local_messages,
    motion_messages,
    object_phrase,
    parse_local_answer,
    parse_motion_answer,
    plan_offline,
    plan_with_llm,
)

__all__ = [
    "APPEARANCE_WORDS", "COLOUR_RGB", "DETERMINERS", "LOCAL_EXAMPLES", "LOCAL_SYSTEM", "MOTION_EXAMPLES",
    "MOTION_SYSTEM", "MOTION_VERBS", "MOTION_VERBS_PLURAL", "Match", "Plan", "PlanningError", "PromptParseError",
    "format_local_answer", "local_messages", "mask_colours", "match_prompts_to_masks", "motion_messages",
    "object_phrase", "parse_local_answer", "parse_motion_answer", "plan_offline", "plan_with_llm",
]

# named colours against a mask's mean colour (`match_prompts_to_masks(rule="colour")`)
COLOUR_RGB = {
    "red": (215, 40, 40), "green": (40, 175, 60), "blue": (40, 80, 220), "yellow": (235, 210, 40),
    "purple": (140, 55, 190), "violet": (140, 55, 190), "orange": (245, 135, 25), "cyan": (40, 200, 210),
    "white": (240, 240, 240), "black": (20, 20, 20), "grey": (128, 128, 128), "gray": (128, 128, 128),
    "brown": (120, 75, 40), "pink": (240, 140, 180), "magenta": (220, 40, 200),
}



# ------------------------------------------------------------------------------------------------------- matching


@dataclasses.dataclass
class Match:
    """`prompt_for_mask[j]`: the index of the local prompt given to first-frame mask j (-1: none, empty prompt)."""

    prompt_for_mask: list[int]
    by: str  # "label" | "colour" | "order"
    scores: list[list[float]] | None = None  # [prompts, masks] similarity used, when not by order

    def local_prompts(self, plan: Plan) -> list[str]:
        """The local prompts in mask order (object id j+1 gets entry j); empty for a mask without a prompt."""
        return [plan.local_prompts[i] if i >= 0 else "" for i in self.prompt_for_mask]

    def to_json(self, plan: Plan, labels: Sequence[str | None] | None = None) -> list[dict]:
        rows = []
        for j, i in enumerate(self.prompt_for_mask):
            rows.append({"object_id": j + 1, "mask_label": labels[j] if labels else None,
                         "local_prompt": plan.local_prompts[i] if i >= 0 else "",
                         "prompt_index": i, "matched_by": self.by})
        return rows


def _words(text: str) -> set[str]:
    return {w[:-1] if w.endswith("s") and len(w) > 3 else w for w in re.findall(r"[a-z]+", text.lower())} - {
        "the", "a", "an", "of", "on", "in", "to", "and", "with"}


def _best_assignment(scores: np.ndarray) -> list[int]:
    """Maximise the total score, prompts [P] to masks [M] (P <= M): brute force up to 8 masks, greedy beyond."""
    p, m = scores.shape
    if m <= 8:
        best, best_perm = -np.inf, None
        for perm in itertools.permutations(range(m), p):
            s = sum(scores[i, j] for i, j in enumerate(perm))
            if s > best + 1e-12:
                best, best_perm = s, perm
        out = [-1] * m
        for i, j in enumerate(best_perm):
            out[j] = i
        return out
    out, used = [-1] * m, set()
    for flat in np.argsort(-scores, axis=None):
        i, j = divmod(int(flat), m)
        if i not in used and out[j] < 0:
            out[j] = i
            used.add(i)
    return out


def mask_colours(image: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Mean RGB of `image uint8 [H, W, 3]` under each of `masks bool [H, W, K]`: float `[K, 3]`."""
    area = masks.sum(axis=(0, 1)).astype(np.float64)
    sums = np.einsum("hwc,hwk->kc", image.astype(np.float64), masks.astype(np.float64))
    return sums / np.maximum(area, 1)[:, None]


def match_prompts_to_masks(plan: Plan, num_masks: int, *, labels: Sequence[str | None] | None = None,
                           image: np.ndarray | None = None, masks: np.ndarray | None = None,
                           rule: str = "auto") -> Match:
    """Which local prompt goes to which first-frame mask.

    `rule`: `label` (word overlap between each prompt's object phrase and the mask's label: PNG file name, COCO
    category, box label), `colour` (the colour word in each object phrase against the mean colour of `image` under
    each mask), `order` (prompt i -> mask i), or `auto`: label when every mask has a label, else colour when every
    prompt names a colour and the image and masks are given, else order. Raises ValueError when the caption names more
    objects than there are masks; masks beyond the prompts get an empty local prompt.
    """
    n_prompts = len(plan.local_prompts)
    if n_prompts > num_masks:
        raise ValueError(
            f"prompts.match_prompts_to_masks: the plan has {n_prompts} local prompts {plan.local_prompts} but only "
            f"{num_masks} first-frame mask(s) were given; give one mask (or box) per moving object in "
            f"config.sample.masks / config.sample.boxes, or describe fewer objects in the caption")
    has_labels = labels is not None and len(labels) == num_masks and all(labels)
    colours = [[w for w in _words(o) if w in COLOUR_RGB] for o in plan.objects]
    can_colour = image is not None and masks is not None and n_prompts > 0 and all(colours)
    if rule == "auto":
        rule = "label" if has_labels else ("colour" if can_colour else "order")
    if rule == "order" or n_prompts == 0:
        return Match([i if i < n_prompts else -1 for i in range(num_masks)], "order")
    if rule == "label":
        if not has_labels:
            raise ValueError("prompts.match_prompts_to_masks: rule 'label' needs a label for every mask (name the mask "
                             "PNGs after their objects, or give labels with the boxes)")
        scores = np.zeros((n_prompts, num_masks))
        for i, o in enumerate(plan.objects):
            for j, lab in enumerate(labels):
                a, b = _words(o), _words(lab)
                scores[i, j] = len(a & b) / max(1, len(a | b))
    elif rule == "colour":
        if not can_colour:
            raise ValueError("prompts.match_prompts_to_masks: rule 'colour' needs the image, the masks and a colour "
                             "word in every object phrase")
        mean = mask_colours(image, masks)
        scores = np.zeros((n_prompts, num_masks))
        for i, names in enumerate(colours):
            for j in range(num_masks):
                d = min(np.linalg.norm(mean[j] - np.array(COLOUR_RGB[n], np.float64)) for n in names)
                scores[i, j] = -d / 255.0
    else:
        raise ValueError(f"prompts.match_prompts_to_masks: rule={rule!r}; choose auto, label, colour or order "
                         f"(config.sample.match)")
    return Match(_best_assignment(scores), rule, scores.round(4).tolist())
