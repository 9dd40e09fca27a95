"""The command line of labelling (the library is `ttm_jax.data.label`; nothing in `ttm_jax/` imports this):

    python -m ttm_jax.data.label --videos=DIR --out=DIR [--captions=FILE | --objects="dog,ball"]
        --detector_path=DIR --sam2_path=DIR [--threshold=0.3] [--device=cuda]

`--detector_path`: a transformers `GroundingDinoForObjectDetection` folder with its processor (e.g.
IDEA-Research/grounding-dino-base, downloaded); `--sam2_path`: a transformers `Sam2VideoModel` folder (e.g.
facebook/sam2.1-hiera-large). Both need the torch extra (`pip install -e .[torch]`). A command line sits above every
layer, so it hands the library the models of `clients.segment`. Re-running the same command skips
the videos already labelled.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from absl import app, flags

from ttm_jax import cli
from ttm_jax.clients import segment
from ttm_jax.data import label

MAX_PRINTED_SKIPS = 20


def main(argv: Sequence[str]) -> None:
    """Labels `--videos` into `--out` and prints what it did."""
    del argv
    f = flags.FLAGS
    cli.require_paths("--videos", f.videos, "a folder of videos (any depth)", command="label")
    if f.captions:
        cli.require_paths("--captions", f.captions, "a captions sidecar JSONL", command="label")
    objects = [o.strip() for o in f.objects.split(",") if o.strip()]
    if not f.captions and not objects:
        raise app.UsageError("give --captions (a sidecar whose local prompts or captions name the objects) or "
                             "--objects='name,name' (the objects to find in every video)")
    try:
        detector = segment.GroundingDino(f.detector_path, device=f.device or None, field="--detector_path")
        tracker = segment.Sam2Video(f.sam2_path, device=f.device or None, field="--sam2_path")
    except segment.SegmentError as e:
        raise app.UsageError(str(e)) from None
    summary = label.label_all(f.videos, f.out, detector.detect, tracker.propagate, captions=f.captions,
                              objects=objects, threshold=f.threshold)
    print(f"labelled into {summary.out} ({summary.already} videos were already there)")
    for message in summary.skipped_videos[:MAX_PRINTED_SKIPS]:
        print(f"skipped {message}")
    if len(summary.skipped_videos) > MAX_PRINTED_SKIPS:
        print(f"... and {len(summary.skipped_videos) - MAX_PRINTED_SKIPS} more skipped videos (in the log)")
    print(summary.line())
    sys.stdout.flush()


def define_flags() -> None:
    """The flags of `main` (defined only when this module runs, so importing it defines nothing)."""
    flags.DEFINE_string("videos", None, "folder of videos to label (any depth)", required=True)
    flags.DEFINE_string("out", None, "output folder: SA-V mp4 + _manual.json per video, captions.jsonl", required=True)
    flags.DEFINE_string("captions", "", "captions sidecar naming each video's objects (local prompts or caption)")
    flags.DEFINE_string("objects", "", "comma-separated object names to find in every video without a caption")
    flags.DEFINE_string("detector_path", "", "transformers GroundingDinoForObjectDetection folder")
    flags.DEFINE_string("sam2_path", "", "transformers Sam2VideoModel folder")
    flags.DEFINE_float("threshold", 0.3, "a name whose best box scores below this is not found")
    flags.DEFINE_string("device", "", "torch device (default: cuda when available, else cpu)")


if __name__ == "__main__":
    define_flags()
    cli.run(main)
