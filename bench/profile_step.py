"""Where the backbone train step's time goes, in JAX and in PyTorch (issue 28; docs/benchmarks.md).

    python bench/profile_step.py --variant=mid [--steps=1] [--side=jax,torch] [--trace_dir=DIR]
    taskset -c 0 python bench/profile_step.py --variant=tiny --steps=3   # one core: XLA and PyTorch single-threaded

The step is `bench/train.py`'s table 2 (forward + MSE + backward + AdamW, fp32: the JAX DiT without TTM's layers and
diffusers' `WanTransformer3DModel` of the same shapes). JAX: a `jax.profiler` trace of `--steps` steps after a
warm-up (XLA's per-op events need `--xla_cpu_enable_xprof_traceme`, which this script adds to `XLA_FLAGS`); every
op is attributed to its module (`attn1`, `ffn/proj_in`, ...) and direction (forward, or backward when JAX's
`transpose(...)` marks it) through the `op_name` metadata of the compiled step's HLO, and summed per module and per
XLA op kind. PyTorch: `torch.profiler`'s self CPU time per aten op for one step. Times are per step; run it on an
idle machine (it prints the load average) and compare shares, not absolute times, between runs.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import sys
import tempfile

_OURS = "--xla_cpu_enable_xprof_traceme=true"
if _OURS not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _OURS).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/train.py
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout, uninstalled

import jax  # noqa: E402
import train as train_bench  # noqa: E402  (bench/train.py)
from jax.profiler import ProfileData  # noqa: E402

# the modules an op is attributed to (the innermost two of these in its op_name path)
_MODULE = re.compile(r"(attn\d|ffn|norm\w*|condition_embedder|patch_embedding|proj_out|proj_in|scale_shift_table|"
                     r"masked_\w+|to_[qkv]|to_out|norm_[qk])$")
_NOT_OPS = ("ThunkExecutor", "SlinkyThreadPool")


def module_key(op_name: str) -> str:
    """'bwd attn1/to_q' for an op whose metadata reads `jit(step)/transpose(jvp(DiT))/.../attn1/to_q/dot_general`."""
    backward = "transpose(" in op_name
    path = re.sub(r"(transpose|jvp)\(([^)]*)\)", r"\2", op_name).split("/")
    mods = [p for p in path if _MODULE.match(p)]
    return ("bwd " if backward else "fwd ") + ("/".join(mods[:2]) if mods else "(outside the blocks)")


def op_metadata(hlo_text: str) -> dict[str, str]:
    """HLO instruction name -> its op_name metadata (the compiled module's top-level instructions: fusions, dots)."""
    out = {}
    for m in re.finditer(r"^\s*(?:ROOT )?%([\w.\-]+) = .*?metadata=\{op_name=\"([^\"]*)\"", hlo_text, re.M):
        out[m.group(1)] = m.group(2)
    return out


def profile_jax(variant: str, steps: int, trace_dir: str) -> tuple[collections.Counter, collections.Counter]:
    one = train_bench.backbone_jax(variant)  # compiled and run once (warm-up)
    meta = op_metadata(one.compiled().as_text())
    one()
    jax.profiler.start_trace(trace_dir)
    for _ in range(steps):
        one()
    jax.profiler.stop_trace()
    trace = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True))[-1]
    by_module, by_kind = collections.Counter(), collections.Counter()
    for plane in ProfileData.from_file(trace).planes:
        for line in plane.lines:
            if not line.name.startswith("tf_XLAEigen") and not line.name.startswith("tf_XLAPjRtCpuClient"):
                continue
            for ev in line.events:
                is_op = ev.name in meta or re.match(r"[\w\-]+\.\d+$", ev.name)
                if ev.name.startswith(_NOT_OPS) or not is_op:
                    continue
                ms = ev.duration_ns / 1e6 / steps
                by_module[module_key(meta.get(ev.name, ""))] += ms
                by_kind[re.sub(r"\.\d+$", "", ev.name)] += ms
    return by_module, by_kind


def profile_torch(variant: str) -> str:
    from torch.profiler import ProfilerActivity, profile

    one = train_bench.backbone_torch(variant)  # built and run once (warm-up)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        one()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=60)


def _table(title: str, counts: collections.Counter, rows: int) -> str:
    total = sum(counts.values())
    lines = [f"| {title} | ms per step | share |", "|---|---:|---:|"]
    lines += [f"| {k} | {v:,.1f} | {v / total:.0%} |" for k, v in counts.most_common(rows)]
    return "\n".join(lines + [f"| total op time | {total:,.1f} | |"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", default="tiny")
    ap.add_argument("--steps", type=int, default=3, help="JAX steps traced after the warm-up")
    ap.add_argument("--side", default="jax,torch")
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--trace_dir", default="", help="where the JAX trace goes (default: a temporary folder)")
    args = ap.parse_args()
    sides = {s for s in args.side.split(",") if s}
    print(f"jax {jax.__version__}, {os.cpu_count()} cores, {train_bench.load_line('before profiling')}")
    if "jax" in sides:
        trace_dir = args.trace_dir or tempfile.mkdtemp(prefix="ttm_profile_")
        by_module, by_kind = profile_jax(args.variant, args.steps, trace_dir)
        print(f"\nJAX {args.variant} backbone step, by module (trace in {trace_dir}):\n")
        print(_table("module", by_module, args.rows))
        print(f"\nJAX {args.variant} backbone step, by XLA op kind:\n")
        print(_table("op kind", by_kind, args.rows))
    if "torch" in sides:
        print(f"\nPyTorch {args.variant} backbone step, self CPU time per op:\n")
        print(profile_torch(args.variant))
    print(train_bench.load_line("after profiling"))


if __name__ == "__main__":
    main()
