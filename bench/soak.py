"""Does a long run stay flat in memory? Trains a stage with sampling and checkpoints every `--every` steps as a real
`python -m ttm_jax.main` process, reads its resident set size (and its children's: Grain workers) from /proc once a
second, and prints the RSS curve against the training step, then the growth from the end of warm-up to the end.

    python bench/soak.py --steps=2000 --every=100 --warmup=200 [--config=configs/stage2.py] [--out=docs/soak.md]
        [-- --config.data.num_workers=2 ...]   (anything after -- goes to ttm_jax.main)

Issue 30's bar: RSS at the last step within 10% of RSS at `--warmup` (after compiling the train and sample steps and
the first checkpoint). Linux only (/proc). Not a test: it takes as long as the run.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEP_LINE = re.compile(r"^step (\d+)/(\d+)")


def rss_bytes(pid: int) -> int:
    """Resident set size of `pid` and all its descendants (0 for a process that has gone)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
                        break
            with open(f"/proc/{p}/task/{p}/children") as f:
                todo += [int(c) for c in f.read().split()]
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return total


def soak(config: str, steps: int, every: int, extra: list[str], workdir: str) -> list[tuple[float, int, int]]:
    """Run the training; returns `(seconds, step, rss bytes)` samples, one a second."""
    cmd = [sys.executable, "-m", "ttm_jax.main", f"--config={config}", f"--workdir={workdir}",
           f"--config.train.total_steps={steps}", f"--config.train.sample_every_steps={every}",
           f"--config.train.checkpoint_every_steps={every}", f"--config.train.log_every_steps={min(every, 10)}",
           *extra]
    print(" ".join(cmd), flush=True)
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    state = {"step": 0}
    samples: list[tuple[float, int, int]] = []
    start = time.time()

    def poll() -> None:
        while proc.poll() is None:
            samples.append((time.time() - start, state["step"], rss_bytes(proc.pid)))
            time.sleep(1.0)

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    assert proc.stdout is not None
    for line in proc.stdout:
        m = STEP_LINE.match(line)
        if m:
            state["step"] = int(m.group(1))
            if state["step"] % every == 0:
                now = rss_bytes(proc.pid)  # also a sample: the poller's last ones at the final step catch the exit
                samples.append((time.time() - start, state["step"], now))
                print(f"{line.rstrip()}   rss {now / 2**20:,.0f} MiB", flush=True)
        elif line.strip() and not line.startswith(("I", "W")):
            print(line.rstrip(), flush=True)
    proc.wait()
    watcher.join()
    if proc.returncode:
        raise SystemExit(f"soak: the training exited with status {proc.returncode}")
    return samples


def at_step(samples: list[tuple[float, int, int]], step: int) -> int:
    """The largest RSS seen while the run was at `step` (the last sample before a later step, if none at it)."""
    at = [r for _, s, r in samples if s == step]
    if at:
        return max(at)
    before = [r for _, s, r in samples if s <= step]
    return before[-1] if before else samples[0][2]


def table(samples: list[tuple[float, int, int]], every: int, steps: int) -> list[str]:
    rows = ["| step | RSS (MiB) |", "|---:|---:|"]
    for step in range(every, steps + 1, every):
        rows.append(f"| {step} | {at_step(samples, step) / 2**20:,.0f} |")
    return rows


def main() -> None:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=os.path.join(ROOT, "configs", "stage2.py"))
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--every", type=int, default=100, help="sample and checkpoint every this many steps")
    ap.add_argument("--warmup", type=int, default=200, help="the step the growth is measured from")
    ap.add_argument("--workdir", default="", help="default: a temporary folder, removed after")
    ap.add_argument("--out", default="", help="also write the table as markdown here")
    a = ap.parse_args(argv)
    if not 0 < a.warmup < a.steps or a.every <= 0:
        ap.error(f"--warmup={a.warmup} must be in (0, --steps={a.steps}) and --every={a.every} > 0")
    with tempfile.TemporaryDirectory() as tmp:
        samples = soak(a.config, a.steps, a.every, extra, a.workdir or os.path.join(tmp, "run"))
    first, last = at_step(samples, a.warmup), at_step(samples, a.steps)
    peak = max(r for _, _, r in samples)
    growth = last / first - 1.0
    lines = table(samples, a.every, a.steps) + [
        "", f"RSS at step {a.warmup}: {first / 2**20:,.0f} MiB; at step {a.steps}: {last / 2**20:,.0f} MiB "
            f"({growth:+.1%}); peak {peak / 2**20:,.0f} MiB; {len(samples)} samples, one a second",
        f"{'flat' if abs(growth) <= 0.10 else 'NOT flat'}: the bar is within 10% after warm-up"]
    print("\n".join(lines))
    if a.out:
        with open(a.out, "w") as f:
            f.write(f"`python bench/soak.py --steps={a.steps} --every={a.every} --warmup={a.warmup}"
                    + (" -- " + " ".join(extra) if extra else "") + "`\n\n" + "\n".join(lines) + "\n")
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
