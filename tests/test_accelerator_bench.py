"""bench/accelerator.py: the one-table accelerator check, on CPU.

Fast tests pin the table's parts (rows survive a failing or overrunning section, the peak table, the model-FLOPs
count, one kernel comparison in interpret mode, the "not available" row of the sparse section). The slow test runs
the whole script with `--quick` (Pallas kernels in interpret mode, tiny shapes) as a subprocess and checks every row
of the table; on a loaded 2-core machine it takes minutes, so it is marked slow.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
import subprocess
import sys
import time

import jax
import pytest

from ttm_jax.assembly import params as params_lib
from ttm_jax.runtime import sharding as sharding_lib
from ttm_jax.train import state as state_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "accelerator.py")


@pytest.fixture(scope="module")
def acc():
    spec = importlib.util.spec_from_file_location("bench_accelerator", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def parse_table(markdown: str) -> list[tuple[str, str, str, str]]:
    """(section, measurement, value, notes) of every body row of the script's markdown table."""
    rows = []
    for line in markdown.splitlines():
        if not line.startswith("| ") or line.startswith("| section |"):
            continue
        cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        assert len(cells) == 4, line
        rows.append(tuple(cells))
    return rows


def test_rows_survive_a_failing_section(acc):
    report = acc.Report("test device")

    def fails(r, quick):
        r.add("a", "first", "1.0", "a | b")
        raise ValueError("boom")

    acc.run_section(report, "a", fails, True, 30)
    acc.run_section(report, "c", lambda r, quick: r.add("c", "train step: steps/s", "2.5"), True, 30)
    rows = parse_table(report.markdown())
    assert rows[0] == ("a", "first", "1.0", "a | b")
    assert rows[1][:3] == ("a", "kernels vs xla: error", "error") and "ValueError: boom" in rows[1][3]
    assert rows[2] == ("c", "train step: steps/s", "2.5", "")
    assert "test device" in report.markdown().splitlines()[0]


def test_section_over_budget_is_an_error_row(acc):
    report = acc.Report("test device")
    t0 = time.perf_counter()
    acc.run_section(report, "d", lambda r, quick: time.sleep(30), True, 0.5)
    assert time.perf_counter() - t0 < 10
    (row,) = parse_table(report.markdown())
    assert row[2] == "error" and "SectionTimeout" in row[3] and "0.5 s" in row[3]


@pytest.mark.parametrize("kind,name,peak", [
    ("NVIDIA H100 80GB HBM3", "H100 SXM", 989.0), ("NVIDIA H200", "H200", 989.0),
    ("NVIDIA A100-SXM4-80GB", "A100", 312.0), ("TPU v4", "TPU v4", 275.0), ("TPU v5 lite", "TPU v5e", 197.0),
    ("TPU v5", "TPU v5p", 459.0), ("TPU v5p", "TPU v5p", 459.0), ("TPU v6 lite", "TPU v6e", 918.0)])
def test_peak_by_device_kind(acc, kind, name, peak):
    assert acc.peak_tflops(kind) == (name, peak)


def test_no_peak_for_cpu(acc):
    assert acc.peak_tflops("cpu") is None


def test_model_flops_of_the_wan_step(acc):
    """The matmul part of `dit_train_flops` is 6 x (params applied per video token) x tokens: below 6 P N by the
    parameters applied to the text tokens only (cross-attention k/v, text embedder) and the per-example ones."""
    c = acc.step_config(False, "cpu")
    assert c.variant == "wan1.3b" and (c.data.num_frames, c.data.height, c.data.width) == (81, 480, 832)
    modules = acc._step_modules(c)
    abstract = jax.eval_shape(params_lib.make_init_params(c, modules), jax.random.PRNGKey(0))
    p = state_lib.param_count(sharding_lib.unbox(abstract))
    n = 21 * 30 * 52
    d, lc, ll = 1536, 512, 5 * 32
    attention = 3 * 4 * d * (30 * (n * n + n * lc) + 8 * (n * n + n * ll))
    flops = acc.dit_train_flops(c)
    matmuls = flops - attention
    assert 0.85 < matmuls / (6 * p * n) < 1.0
    # per-token parameters: blocks (4 + 2 attention projections, FFN) and the 8 added layers (4 + 2)
    per_token = 30 * (6 * d * d + 2 * d * 8960) + 8 * 6 * d * d
    assert math.isclose(matmuls, 6 * per_token * n, rel_tol=0.01)


def test_kernel_matches_xla_in_interpret_mode(acc):
    shape = {"grid": (1, 4, 8), "heads": 2, "head_dim": 16, "slots": 3, "lp": 4}
    e = acc.kernel_errors("gpu", "self", "float32", shape, interpret=True)
    assert e["lq"] == e["lk"] == 32
    assert e["out"] < 1e-5 and e["grad"] < 1e-5 and e["xla_out"] == 0.0


def test_sparse_not_available_is_a_row(acc, monkeypatch):
    real = acc.importlib.import_module

    def no_sparse(name, *a, **kw):
        if name == "ttm_jax.models.sparse_attention":
            raise ImportError("not here")
        return real(name, *a, **kw)

    monkeypatch.setattr(acc.importlib, "import_module", no_sparse)
    report = acc.Report("test device")
    acc.section_sparse(report, True)
    (row,) = parse_table(report.markdown())
    assert row[0] == "b" and row[2] == "not available" and "not here" in row[3]


@pytest.mark.slow
def test_quick_run_fills_every_row(tmp_path):
    out = tmp_path / "accelerator.md"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, SCRIPT, "--quick", f"--out={out}"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = out.read_text()
    assert proc.stdout.strip() == table.strip()  # stdout holds the table alone; progress goes to stderr
    rows = parse_table(table)
    assert not [r for r in rows if r[2] == "error"], table
    by_section: dict[str, list] = {}
    for r in rows:
        by_section.setdefault(r[0], []).append(r)
    # (a): self and cross, bf16 and fp32, values and gradients under the tolerance
    kernel_rows = by_section["a"]
    assert len(kernel_rows) == 4
    for _section, item, value, note in kernel_rows:
        out_err, grad_err = (float(x) for x in value.split(" / "))
        tol = 6e-2 if "bfloat16" in item else 5e-3
        assert out_err <= tol and grad_err <= tol, (item, value)
        assert ": ok" in note
    # (b): speed-ups as numbers, or "not available" when the checkout has no sparse path
    sparse_rows = by_section["b"]
    if sparse_rows[0][2] != "not available":
        speedups = [float(r[2].rstrip("x")) for r in sparse_rows if r[1].endswith("speed-up")]
        assert len(speedups) == 2 and all(s > 0 for s in speedups)  # CPU: the XLA block loop, forward and both
        (diff,) = [r[2] for r in sparse_rows if "max abs diff" in r[1]]
        assert max(float(x) for x in diff.split(" / ")) < 1e-4  # values / gradients
    # (c): steps/s > 0, cost-analysis FLOPs a number, memory reported
    step = {r[1]: r for r in by_section["c"]}
    assert float(step["train step: steps/s"][2]) > 0
    assert float(step["compiled step FLOPs (cost analysis)"][2]) > 0
    assert "GiB" in step["peak device memory"][2]
    # (d): the loop ran and wrote samples; losses parse
    (e2e,) = by_section["d"]
    first, last = (float(x) for x in e2e[2].split(" -> "))
    assert math.isfinite(first) and math.isfinite(last) and "2 sample mp4(s)" in e2e[3]


@pytest.mark.slow  # the section of a bench script (the ops it times are tested in test_context_*.py)
def test_context_section_on_8_cpu_devices(acc):
    """Section (e) --quick on the 8 simulated CPU devices: ulysses and ring, plain / masked / sparse, each within
    float32 rounding of the one-device op (values / gradients), with its timing note."""
    report = acc.Report("test device")
    acc.section_context(report, True)
    rows = parse_table(report.markdown())
    assert [r[1].split(" self-attn")[0] for r in rows] == [f"{impl} {kind}" for kind in ("plain", "masked", "sparse")
                                                          for impl in ("ulysses", "ring")]
    for _section, _item, value, note in rows:
        assert max(float(x) for x in value.split(" / ")) < 1e-5
        assert "context=8" in note and "fwd+bwd" in note


def test_context_section_skips_one_device(acc, monkeypatch):
    monkeypatch.setattr(acc.jax, "device_count", lambda: 1)
    report = acc.Report("test device")
    acc.section_context(report, True)
    (row,) = parse_table(report.markdown())
    assert row[0] == "e" and row[2] == "skipped" and "one cpu device" in row[3]
