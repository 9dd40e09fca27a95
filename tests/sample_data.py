"""Test data shared by several test files: where the real SA-V sample files (`shared/data/sav_sample`) are,
and synthetic SA-V with one video left uncaptioned.

`$TTM_SAV_SAMPLE` if set, else `../shared/data/sav_sample` beside this checkout, else `/work/shared/data/sav_sample`.
"""

import os

from ttm_jax.data import synthetic

_HERE = os.path.dirname(os.path.abspath(__file__))
_CANDIDATES = (
    os.environ.get("TTM_SAV_SAMPLE", ""),
    os.path.join(_HERE, "..", "..", "shared", "data", "sav_sample"),
    "/work/shared/data/sav_sample",
)


def _find() -> str:
    for path in _CANDIDATES:
        if path and os.path.exists(os.path.join(path, "sav_000001_manual.json")):
            return os.path.abspath(path)
    return os.path.abspath(_CANDIDATES[1])


SAV_SAMPLE = _find()


def synthetic_sav_without_last_caption(out: str, num_videos: int, *, frames: int) -> str:
    """Synthetic SA-V (64x64, seed 1, 4 videos a shard) in `out` whose last video has no caption line: the
    preparation tests' "missing caption" case."""
    synthetic.generate(out, num_videos, seed=1, height=64, width=64, frames=frames, videos_per_shard=4)
    caps = os.path.join(out, synthetic.CAPTIONS_FILE)
    with open(caps) as f:
        lines = f.read().splitlines()
    with open(caps, "w") as f:
        f.write("\n".join(lines[:-1]) + "\n")
    return out
