"""The command line of the preparation (the library is `ttm_jax.data.prepare`; nothing in `ttm_jax/` imports this):

    python -m ttm_jax.data.prepare --sav=PATH --captions=JSONL --out=DIR [--config=configs/stage2.py[:variant]]
        [--workers=N] [--chunk_size=8] [--clips_per_video=1] [--seed=0] [--latents] [--format=records|tfds]
        [--beam_pipeline_options="runner=DirectRunner,direct_num_workers=2"]

`--format=records` (default) writes the ArrayRecord folder of `prepare.prepare`, `--format=tfds` the TFDS dataset
`sav_clips` of `tfds_sav.build` with --out as its data_dir; with `--beam_pipeline_options` that build runs on Apache
Beam (`pip install -e .[beam]`; the same records, `data/beam_sav.py`). A command line sits above every layer, so it
hands the preparation the autoencoder factory for `--latents`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from absl import flags
from ml_collections import config_flags

from ttm_jax import cli
from ttm_jax import config as config_lib
from ttm_jax.assembly.registry import make_autoencoder
from ttm_jax.data import prepare, records, tfds_sav

# the repository's configs/stage2.py (this file is ttm_jax/data/prepare/__main__.py)
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
DEFAULT_CONFIG = os.path.join(_ROOT, "configs", "stage2.py")
# skipped videos listed one per line before the summary; the manifest keeps them all
MAX_PRINTED_SKIPS = 20


def main(argv: Sequence[str]) -> None:
    """Prepares `--sav` + `--captions` into `--out` (records or TFDS) and prints what it did."""
    del argv
    f = flags.FLAGS
    cli.require_paths("--sav", f.sav, "SA-V tar shards or folders of them", command="prepare")
    cli.require_paths("--captions", f.captions, "the captions sidecar JSONL (`python -m ttm_jax.data.caption` "
                      "writes one)", command="prepare")
    config = config_lib.validate(f.config)
    if f.beam_pipeline_options is not None and f.format != "tfds":
        raise cli.BadInput("prepare --beam_pipeline_options: Beam builds the TFDS dataset; add --format=tfds")
    if f.format == "tfds":  # a TFDS dataset (array_record) under --out: data/tfds_sav.py
        if f.latents:
            raise cli.BadInput("prepare --format=tfds: --latents is not supported by the TFDS builder; use "
                             "--format=records for cached latents")
        builder = tfds_sav.build(f.sav, f.captions, f.out, config, seed=f.seed, clips_per_video=f.clips_per_video,
                                 beam_options=f.beam_pipeline_options)
        meta = builder.info.metadata
        reasons = ", ".join(f"{r}={n}" for r, n in sorted(meta["skipped"].items()))
        print(f"prepared {meta['num_records']} records into {builder.data_dir} (TFDS {tfds_sav.NAME}/"
              f"{builder.builder_config.name}; set config.data.prepared_path to it)")
        print(f"videos: {meta['videos_ok']} ok, {sum(meta['skipped'].values())} skipped"
              + (f" ({reasons})" if reasons else ""))
        sys.stdout.flush()
        return
    summary = prepare.prepare(f.sav, f.captions, f.out, config, workers=f.workers, chunk_size=f.chunk_size,
                              clips_per_video=f.clips_per_video, seed=f.seed, latents=f.latents,
                              make_autoencoder=make_autoencoder)
    print(f"prepared {summary.num_records} records into {summary.out}")
    for message in summary.skipped_videos[:MAX_PRINTED_SKIPS]:
        print(f"skipped {message}")
    if len(summary.skipped_videos) > MAX_PRINTED_SKIPS:
        print(f"... and {len(summary.skipped_videos) - MAX_PRINTED_SKIPS} more skipped videos: see skipped_videos in "
              f"{os.path.join(summary.out, records.MANIFEST)}")
    print(summary.line())
    sys.stdout.flush()


def define_flags() -> None:
    """The flags of `main` (defined only when this module runs, so importing it defines nothing)."""
    flags.DEFINE_string("sav", None, "SA-V tar shards or folders (comma-separated for several)", required=True)
    flags.DEFINE_string("captions", None, "captions sidecar JSONL", required=True)
    flags.DEFINE_string("out", None, "output folder of ArrayRecord shards", required=True)
    config_flags.DEFINE_config_file("config", DEFAULT_CONFIG, "config file[:variant]; its data section shapes the "
                                    "clips (overrides: --config.data.num_frames=17)")
    flags.DEFINE_integer("workers", 1, "processes, each preparing one chunk of videos at a time")
    flags.DEFINE_integer("chunk_size", 8, "videos per shard (the unit of resumption)")
    flags.DEFINE_integer("clips_per_video", 1, "clips cut from each video")
    flags.DEFINE_integer("seed", 0, "clip sampling seed")
    flags.DEFINE_bool("latents", False, "also store VAE latents of video and trajectory")
    flags.DEFINE_enum("format", "records", ["records", "tfds"], "records: this module's ArrayRecord folder; tfds: "
                      "the TFDS dataset sav_clips (array_record) under --out as data_dir (ttm_jax/data/tfds_sav.py)")
    flags.DEFINE_string("beam_pipeline_options", None, "with --format=tfds: build on Apache Beam with these pipeline "
                        "options, comma-separated key=value (runner=DirectRunner,direct_num_workers=2; "
                        "runner=DataflowRunner,project=...); needs pip install -e .[beam]")


if __name__ == "__main__":
    define_flags()
    cli.run(main)
