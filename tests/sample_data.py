"""Test data shared by several test files: where the real SA-V sample files (`shared/data/sav_sample`) are, and
synthetic SA-V with one video left uncaptioned.

The sample folder is `$TTM_SAV_SAMPLE` when that is set, else `../shared/data/sav_sample` beside this checkout (the
repository root's sibling `shared/`); nothing else is searched. A test that reads the sample marks itself
`@needs_sample("file", ...)` (or `pytestmark = needs_sample(...)`): without those files it is skipped with a reason
that names the missing file, where it was looked for and how to point the tests at it (`missing_reason`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import pytest

from ttm_jax.data import synthetic

ENV = "TTM_SAV_SAMPLE"
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BESIDE_CHECKOUT = os.path.join(os.path.dirname(_REPO), "shared", "data", "sav_sample")


def sample_dir(env: Mapping[str, str] = os.environ) -> str:
    """The sample folder: `$TTM_SAV_SAMPLE` if set (non-empty), else `../shared/data/sav_sample` beside the checkout;
    whether it exists or not."""
    return os.path.abspath(env.get(ENV) or BESIDE_CHECKOUT)


SAV_SAMPLE = sample_dir()


def missing_reason(*names: str, env: Mapping[str, str] = os.environ) -> str | None:
    """None if the sample folder holds every file in `names`, else why not and the fix (a skip reason)."""
    folder = sample_dir(env)
    missing = [n for n in names if not os.path.exists(os.path.join(folder, n))]
    if not missing:
        return None
    where = (f"${ENV}={env[ENV]}" if env.get(ENV) else
             f"${ENV} is not set, so the sample is looked for beside the checkout at {folder}")
    return (f"real SA-V sample missing: {', '.join(missing)} not in {folder} ({where}); set {ENV} to the folder "
            f"holding the sample files (shared/data/sav_sample), or put them at {BESIDE_CHECKOUT}")


def needs_sample(*names: str) -> pytest.MarkDecorator:
    """Skip marker for tests that read the sample files `names` (relative to the sample folder)."""
    reason = missing_reason(*names)
    return pytest.mark.skipif(reason is not None, reason=reason or "")


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
