"""The command line of the encoding program (the library is `ttm_jax.data.encode`; nothing in `ttm_jax/` imports
this):

    python -m ttm_jax.data.encode --prepared=IN --out=OUT --config=configs/stage2.py[:variant] [--batch_size=N]
        [--records_per_shard=64]

Run it like training: one process per host (`jax.distributed` from the environment unless
`--config.mesh.distributed=skip`). Then train with `--config.data.prepared_path=OUT --config.data.cached=True`.
A command line sits above every layer, so it hands the library the assembled encoders
(`assembly.frozen.make_encoders`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from absl import flags
from ml_collections import config_flags

from ttm_jax import cli
from ttm_jax import config as config_lib
from ttm_jax.assembly import frozen as frozen_lib
from ttm_jax.data import encode
from ttm_jax.runtime import mesh as mesh_lib

# the repository's configs/stage2.py (this file is ttm_jax/data/encode/__main__.py)
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
DEFAULT_CONFIG = os.path.join(_ROOT, "configs", "stage2.py")
# test hook: SIGKILL this process in the middle of this run's output shard number N
KILL_ENV = "TTM_ENCODE_KILL_AT_SHARD"


def main(argv: Sequence[str]) -> None:
    """Encodes this process' share of `--prepared` into `--out` and prints what it did."""
    del argv
    f = flags.FLAGS
    cli.require_paths("--prepared", f.prepared, "a folder of `python -m ttm_jax.data.prepare`", command="encode")
    config = config_lib.validate(f.config)
    mesh_lib.initialize_distributed(config.mesh)
    mesh = frozen_lib.encoding_mesh(config)
    encoders = frozen_lib.make_encoders(config, mesh)
    kill_at = os.environ.get(KILL_ENV)
    try:
        summary = encode.encode(f.prepared, f.out, config, encoders, batch_size=f.batch_size or None,
                                records_per_shard=f.records_per_shard,
                                interrupt_at_shard=None if kill_at is None else int(kill_at))
    except encode.EncodeInterrupted:
        os.kill(os.getpid(), 9)  # die for real, the partial shard's temporary file left behind
        raise
    print(f"encoded {summary.records} records in {summary.shards_done} shards ({summary.shards_skipped} already "
          f"done) into {summary.out}, {summary.clips_per_s:.2f} clips/s"
          + ("; complete: train with --config.data.prepared_path=" + summary.out + " --config.data.cached=True"
             if summary.complete else "; other processes still encoding"))
    sys.stdout.flush()


def define_flags() -> None:
    """The flags of `main` (defined only when this module runs)."""
    flags.DEFINE_string("prepared", None, "a folder of `python -m ttm_jax.data.prepare`", required=True)
    flags.DEFINE_string("out", None, "output folder (any etils.epath path, gs:// too)", required=True)
    config_flags.DEFINE_config_file("config", DEFAULT_CONFIG, "config file[:variant] of the training run: its "
                                    "autoencoder and text encoder make the cache")
    flags.DEFINE_integer("batch_size", 0, "clips per encoder call (0: this process' device count)")
    flags.DEFINE_integer("records_per_shard", 64, "records per output shard (the unit of resumption and of the "
                         "processes' shares)")


if __name__ == "__main__":
    define_flags()
    cli.run(main)
