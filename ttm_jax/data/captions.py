"""The captions sidecar: one JSON object per line, keyed by SA-V video id.

    {"video_id": "sav_000001", "caption": "...", "motion_prompt": "...",
     "local_prompts": {"<masklet_id>": "left dog: the dog runs to the left", ...}, "category": "animals"}

`caption` (the full caption `c`), `motion_prompt` (`c_motion`: motion only) and `local_prompts` (`c_local[i]`, keyed by
masklet id as a string; `"auto:<id>"` for auto masklets read with annotation="both") are required; `category` is
optional. SA-V ships no captions: a VLM/LLM pass writes this file (the paper uses Llama 3.1-8B for the split).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterable, Mapping

from etils import epath

from ttm_jax import cli
from ttm_jax.data.video_io import SkipVideo

REQUIRED = ("video_id", "caption", "motion_prompt", "local_prompts")


class CaptionsError(cli.UserError, ValueError):
    """A malformed sidecar line, or a missing caption with config.data.missing_captions='error'."""


@dataclasses.dataclass(frozen=True)
class CaptionEntry:
    video_id: str
    caption: str
    motion_prompt: str
    local_prompts: Mapping[str, str]  # masklet key (str(masklet_id)) -> local prompt
    category: str | None = None

    def to_json(self) -> dict:
        d = {"video_id": self.video_id, "caption": self.caption, "motion_prompt": self.motion_prompt,
             "local_prompts": dict(self.local_prompts)}
        if self.category is not None:
            d["category"] = self.category
        return d


def parse_line(line: str, *, file: str = "<captions>", lineno: int = 0) -> CaptionEntry:
    """One JSONL line -> `CaptionEntry`; raises `CaptionsError` naming file:line and the field."""
    where = f"{file}:{lineno}"
    try:
        d = json.loads(line)
    except json.JSONDecodeError as e:
        raise CaptionsError(f"{where}: not valid JSON ({e}); each line must be one JSON object") from e
    if not isinstance(d, dict):
        raise CaptionsError(f"{where}: line is not a JSON object")
    missing = [f for f in REQUIRED if f not in d]
    if missing:
        raise CaptionsError(f"{where}: missing field(s) {missing}; each line needs {list(REQUIRED)}")
    for f in ("video_id", "caption", "motion_prompt"):
        if not isinstance(d[f], str):
            raise CaptionsError(f"{where}: field {f!r} must be a string, got {type(d[f]).__name__}")
    lp = d["local_prompts"]
    if not isinstance(lp, dict) or not all(isinstance(v, str) for v in lp.values()):
        raise CaptionsError(f"{where}: field 'local_prompts' must map masklet ids to strings, e.g. "
                            '{"0": "the dog runs left"}')
    cat = d.get("category")
    if cat is not None and not isinstance(cat, str):
        raise CaptionsError(f"{where}: field 'category' must be a string or absent")
    return CaptionEntry(d["video_id"], d["caption"], d["motion_prompt"], {str(k): v for k, v in lp.items()}, cat)


def load_captions(path) -> dict[str, CaptionEntry]:
    """Read a sidecar JSONL (any etils.epath path) -> {video_id: CaptionEntry}. Blank lines are allowed; a video id
    twice is an error (which caption is right is not ours to guess)."""
    p = epath.Path(path)
    if not p.exists():
        raise cli.MissingInput(f"{p}: captions sidecar not found; set config.data.captions to the JSONL file")
    out: dict[str, CaptionEntry] = {}
    for lineno, line in enumerate(p.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        e = parse_line(line, file=str(p), lineno=lineno)
        if e.video_id in out:
            raise CaptionsError(f"{p}:{lineno}: video_id {e.video_id!r} appears twice; keep one line per video")
        out[e.video_id] = e
    logging.info("load_captions: %d entries from %s", len(out), p)
    return out


def write_captions(path, entries: Iterable[CaptionEntry]) -> None:
    """Write entries as a sidecar JSONL (sorted by video id, one line each)."""
    lines = [json.dumps(e.to_json(), ensure_ascii=False, sort_keys=True)
             for e in sorted(entries, key=lambda e: e.video_id)]
    p = epath.Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text("\n".join(lines) + "\n")


def lookup(captions: Mapping[str, CaptionEntry], video_id: str, *, file: str = "", missing: str = "skip"
           ) -> CaptionEntry:
    """The entry of `video_id`; if absent, `SkipVideo("missing_caption")` (missing="skip") or `CaptionsError`
    (missing="error", config.data.missing_captions)."""
    e = captions.get(video_id)
    if e is not None:
        return e
    msg = f"video {video_id} has no line in the captions sidecar"
    if missing == "error":
        raise CaptionsError(f"{file or video_id}: {msg}; add one, or set config.data.missing_captions='skip'")
    if missing != "skip":
        raise ValueError(f"lookup: missing={missing!r}; choose skip or error (config.data.missing_captions)")
    raise SkipVideo("missing_caption", file or video_id, msg)
