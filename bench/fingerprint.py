"""Fingerprint of a short training run: sha256 of the final parameters and of the per-step losses.

    python bench/fingerprint.py [--stage=2] [--steps=20] [--workdir=/tmp/fingerprint]

Runs `python -m ttm_jax.main` on the tiny config for `--steps` steps (loss logged every step, no samples), then reads
the last checkpoint's `state` with Orbax (every leaf, in path order) and the `train/loss` scalars from the TensorBoard
event file. Two runs of the same code print the same hashes; a refactor that keeps behaviour keeps them. It uses only
the command line, Orbax and the event file, so it reads any version of the code the same way.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import os
import shutil
import struct
import subprocess
import sys

import numpy as np


def read_scalars(event_dir: str) -> dict[str, list[tuple[int, float]]]:
    """Scalars of every tfevents file under `event_dir`: {tag: [(step, value), ...]} (TFRecord framing)."""
    from tensorboardX.proto import event_pb2

    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(glob.glob(os.path.join(event_dir, "**", "*tfevents*"), recursive=True)):
        with open(path, "rb") as f:
            data = f.read()
        pos = 0
        while pos + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            record = data[pos + 12:pos + 12 + length]
            pos += 12 + length + 4
            event = event_pb2.Event.FromString(record)
            for v in event.summary.value:
                out.setdefault(v.tag, []).append((int(event.step), float(v.simple_value)))
    return out


def params_digest(workdir: str) -> tuple[str, int, int]:
    """(sha256 over every leaf of the latest checkpoint's state in path order, number of leaves, step)."""
    import jax
    import orbax.checkpoint as ocp

    ckpt_dir = os.path.join(workdir, "checkpoints")
    step = max(int(s) for s in os.listdir(ckpt_dir) if s.isdigit())
    with ocp.PyTreeCheckpointer() as ckptr:
        tree = ckptr.restore(os.path.join(ckpt_dir, str(step), "state"))
    h = hashlib.sha256()
    leaves = jax.tree.leaves_with_path(tree)
    for path, leaf in sorted(leaves, key=lambda kv: jax.tree_util.keystr(kv[0])):
        arr = np.asarray(leaf)
        h.update(jax.tree_util.keystr(path).encode())
        h.update(str(arr.dtype).encode() + str(arr.shape).encode())
        h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest(), len(leaves), step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stage", type=int, default=2)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--workdir", default="/tmp/fingerprint")
    args = p.parse_args()
    workdir = os.path.join(args.workdir, f"stage{args.stage}")
    shutil.rmtree(workdir, ignore_errors=True)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, "-m", "ttm_jax.main", f"--config={root}/configs/stage{args.stage}.py",
           f"--workdir={workdir}", f"--config.train.total_steps={args.steps}", "--config.train.log_every_steps=1",
           "--config.train.sample_every_steps=0", f"--config.data.synthetic_dir={args.workdir}/synthetic_sav"]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=root)
    losses = read_scalars(os.path.join(workdir, "tensorboard")).get("train/loss") or \
        read_scalars(os.path.join(workdir, "tensorboard")).get("loss")
    losses = sorted(losses)
    digest, n, step = params_digest(workdir)
    loss_bytes = np.asarray([v for _, v in losses], np.float32).tobytes()
    print(f"steps {step}, {n} state leaves")
    print(f"losses ({len(losses)}): first {losses[0][1]:.6f}, last {losses[-1][1]:.6f}")
    print(f"state sha256:  {digest}")
    print(f"losses sha256: {hashlib.sha256(loss_bytes).hexdigest()}")


if __name__ == "__main__":
    main()
