"""Where the real SA-V sample files (`shared/data/sav_sample`) are, for every test that reads them.

`$TTM_SAV_SAMPLE` if set, else `../shared/data/sav_sample` beside this checkout, else `/work/shared/data/sav_sample`.
"""

import os

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
