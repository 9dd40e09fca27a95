"""The one entry point: `python -m ttm_jax.main --config=configs/stage2.py[:variant] --workdir=DIR [--mode=...]`.

Modes:
  train     (default for stage configs) train stage 1 or 2; resumes from the workdir's latest checkpoint
  describe  build the model with `jax.eval_shape` (no parameter memory): per-module parameter table, totals,
            FLOPs per training step from the compiled cost analysis
  sample    (default for `configs/sample.py`) two-stage generation from trained workdirs

Overrides: `--config.train.total_steps=500`, `--config.model.attention=splash`, ... A run can be restarted from its
workdir alone: without `--config`, the config saved in the workdir (`config.json`) is used.
"""

from __future__ import annotations

import os
import sys

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from ttm_jax import config as config_lib
from ttm_jax import describe
from ttm_jax.inference import run as sample_run
from ttm_jax.runtime import checkpoint as checkpoint_lib
from ttm_jax.train import loop

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "stage2.py")

_CONFIG = config_flags.DEFINE_config_file(
    "config", _DEFAULT_CONFIG, "Config file, `path.py[:arg]`; default: configs/stage2.py (tiny).", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics, samples and the config go.")
_MODE = flags.DEFINE_enum("mode", None, ["train", "describe", "sample"], "What to do; default from the config.")


def resolve_config(config_flag_present: bool, config: ml_collections.ConfigDict, workdir: str | None
                   ) -> ml_collections.ConfigDict:
    """`--config` when given; else the config saved in `workdir` (`checkpoint.load_config`) when there is one; else
    the default."""
    if not config_flag_present and workdir:
        try:
            saved = checkpoint_lib.load_config(workdir)
        except FileNotFoundError:
            return config
        logging.info("Using the config saved in %s", workdir)
        return saved
    return config


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}; overrides are flags: --config.train.total_steps=10")
    config = resolve_config(flags.FLAGS["config"].present, _CONFIG.value, _WORKDIR.value)
    job = config.get("job", "train")
    mode = _MODE.value or ("sample" if job == "sample" else "train")
    if mode == "sample" or job == "sample":
        if _WORKDIR.value is None:
            raise app.UsageError("--workdir is required: the folder where the videos are written")
        sample_run.validate(config)
        sample_run.sample(config, _WORKDIR.value)
        return
    # A bad config fails here, before any compute is spent.
    try:
        config_lib.validate(config)
    except config_lib.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if mode == "describe":
        describe.describe(config)
        return
    if _WORKDIR.value is None:
        raise app.UsageError("--workdir is required for training: checkpoints, metrics and samples go there")
    loop.train(config, _WORKDIR.value)


def run() -> None:
    app.run(main)


if __name__ == "__main__":
    run()
