"""One accelerator check, one table: kernels, sparse speed-up, the wan1.3b step, a tiny end-to-end run.

    python bench/accelerator.py --out=accelerator.md            # one CUDA GPU (H100/H200) or one TPU chip, < 8 min
    python bench/accelerator.py --quick                         # tiny shapes everywhere (CPU, Pallas in interpret mode)
    python bench/accelerator.py --only=a,c                      # some sections only

Prints ONE markdown table (progress lines go to stderr), headed by the device, with these sections:

  a  attention kernels vs the `xla` reference on the device: max abs error of the values and of the gradients
     (dq, dk, dv through a random cotangent) for masked self-attention and masked cross-attention, in bf16 and fp32,
     for the kernel of the backend (`gpu` on CUDA, `splash` on TPU; on CPU in interpret mode: `gpu` with --quick,
     both without). Small grids (4,680 tokens, 12 heads of 128; --quick: 96 tokens). The reference is
     `xla` in fp32 at the highest matmul precision on the same (rounded) inputs; the note gives `xla`'s own bf16 error
     as the yardstick and the tolerance the row is judged by.
  b  object-sparse masked self-attention (`config.model.attention_sparse`, ttm_jax/models/sparse_attention.py) vs the
     dense masked path of the backend, forward and forward+backward, on a scene whose largest segment holds half the
     tokens (ideal speed-up 3x: sum n_k^2 / N^2 = 1/4 + 3/36): the sparse op with the backend's kernel (splash with
     its on-device block table on TPU, the Pallas kernel on GPU; ttm_jax/models/sparse_pallas.py) and with the XLA
     block loop, each with its max abs difference from the dense path (values / gradients); "not available" when
     this checkout has no sparse path.
  c  the `wan1.3b` stage-2 train step (`ttm_jax.train.step.make_train_step`: DiT forward + backward + AdamW) at
     480x832, 81 frames (21x30x52 = 32,760 tokens), batch 1, bf16 compute, fp32 params, full remat, the backend's
     attention kernel; random weights, a synthetic batch fed straight into the jitted step (no data pipeline) that
     carries what `data/encode` caches (`video_latent`/`trajectory_latent`, `caption_embedding`/`local_embedding`), so
     neither the VAE nor the umT5 text encoder is in the step (`config.data.cached` training). Reports steps/s
     (median of timed steps after compile and a warm-up step), MFU against the device's bf16 dense peak
     (`PEAK_BF16_TFLOPS`; model FLOPs from the DiT's shapes, `dit_train_flops`: matmuls and attention, masked
     attention counted dense, remat recompute not counted), the compiled step's `cost_analysis()` FLOPs (remat
     included; custom calls such as Pallas/cuDNN attention count as 0 there), the peak device memory
     (`memory_stats()['peak_bytes_in_use']`, the process' peak so far) and XLA's planned peak.
  d  a tiny end-to-end run: the `tiny` stage-2 config (`runlocal` size) on synthetic SA-V through the real loop
     (`ttm_jax.train.loop.train`: Grain pipeline, checkpoints, the loop's sampler writing mp4s) in a temporary workdir,
     with the loss at the first and the last step; the backend's attention kernel, and `xla` again if that fails.
  e  context parallelism (ttm_jax/models/context_parallel.py): Ulysses and ring attention with the sequence over a
     `context` mesh axis of every device, against the single-device op on the same (one) device: max abs difference
     of the values and gradients, and forward+backward time of each, for plain, masked and object-sparse
     (`ObjectSort`) self-attention at one size (4,680 tokens, heads a multiple of the device count, 128 wide;
     --quick: 64 tokens); one "skipped" row, saying why, with one device.

Every section runs under its own time budget (a SIGALRM ends it when Python regains control) and try/except: a
failing section leaves an error row and the other sections still report. `--quick` shrinks every shape (the test,
tests/test_accelerator_bench.py, runs it on CPU).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import gc
import importlib
import inspect
import math
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout, uninstalled

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from ttm_jax import config as config_lib  # noqa: E402
from ttm_jax.assembly import params as params_lib  # noqa: E402
from ttm_jax.assembly import registry  # noqa: E402
from ttm_jax.assembly.modules import Modules  # noqa: E402
from ttm_jax.models import attention as attention_lib  # noqa: E402
from ttm_jax.models import masks as masks_lib  # noqa: E402
from ttm_jax.runtime import compile as compile_lib  # noqa: E402
from ttm_jax.runtime import mesh as mesh_lib  # noqa: E402
from ttm_jax.runtime import sharding as sharding_lib  # noqa: E402
from ttm_jax.train import loop as loop_lib  # noqa: E402
from ttm_jax.train import state as state_lib  # noqa: E402
from ttm_jax.train import step as step_lib  # noqa: E402

GIB = 2.0**30
SECTIONS = ("a", "b", "c", "d", "e")
TITLES = {"a": "kernels vs xla", "b": "object-sparse masked self-attention", "c": "wan1.3b stage-2 train step",
          "d": "tiny end-to-end train + sample", "e": "context-parallel attention"}
# seconds per section: on an accelerator the five are cut to TOTAL_BUDGET_S (the script's limit is 8 min with
# start-up); (e) runs last and takes what is left, at most its budget
BUDGET_S = {"a": 75, "b": 60, "c": 210, "d": 90, "e": 60}
BUDGET_QUICK_S = {"a": 120, "b": 60, "c": 120, "d": 120, "e": 120}
TOTAL_BUDGET_S = 465  # the whole script on an accelerator (8 min less start-up); sections are cut to what is left

# bf16 dense peak TFLOP/s by device kind (`jax.Device.device_kind`, lower case, first substring that matches).
# TPU kinds: "TPU v4", "TPU v5 lite" (v5e), "TPU v5" / "TPU v5p" (v5p), "TPU v6 lite" / "TPU v6e" (v6e).
PEAK_BF16_TFLOPS: tuple[tuple[str, str, float], ...] = (
    ("h200", "H200", 989.0),
    ("h100", "H100 SXM", 989.0),  # an H100 PCIe is ~756: its MFU here reads low
    ("a100", "A100", 312.0),
    ("v5 lite", "TPU v5e", 197.0),
    ("v5e", "TPU v5e", 197.0),
    ("v5p", "TPU v5p", 459.0),
    ("v5", "TPU v5p", 459.0),
    ("v6 lite", "TPU v6e", 918.0),
    ("v6e", "TPU v6e", 918.0),
    ("v4", "TPU v4", 275.0),
)

# error tolerances of section (a) (max abs error against the fp32 reference; values and gradients are O(1))
TOLERANCE = {"float32": 5e-3, "bfloat16": 6e-2}


def log(msg: str) -> None:
    print(f"[accelerator {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def peak_tflops(device_kind: str) -> tuple[str, float] | None:
    """(name, bf16 dense peak TFLOP/s) of a device kind, or None when the table has no entry (CPU)."""
    kind = device_kind.lower()
    for key, name, peak in PEAK_BF16_TFLOPS:
        if key in kind:
            return name, peak
    return None


def device_impl(backend: str) -> list[str]:
    """The Pallas kernels to check on `backend`: the one of the backend, both (interpret mode) on CPU."""
    return {"gpu": ["gpu"], "cuda": ["gpu"], "tpu": ["splash"]}.get(backend, ["gpu", "splash"])


def model_impl(backend: str) -> str:
    """`config.model.attention` for a whole model on `backend` (the reference on CPU: no interpret flag there)."""
    return {"gpu": "gpu", "cuda": "gpu", "tpu": "splash"}.get(backend, "xla")


# ------------------------------------------------------------------------------------------------------ the table


@dataclasses.dataclass
class Row:
    section: str
    item: str
    value: str
    note: str = ""


class Report:
    """The rows of the one table, in the order added."""

    def __init__(self, device: str):
        self.device = device
        self.rows: list[Row] = []

    def add(self, section: str, item: str, value: str, note: str = "") -> None:
        self.rows.append(Row(section, item, value, note))
        log(f"row {section}: {item} = {value}" + (f" ({note})" if note else ""))

    def markdown(self) -> str:
        def cell(s: str) -> str:
            return str(s).replace("|", "\\|").replace("\n", " ")

        lines = [f"Accelerator check on **{cell(self.device)}**", "",
                 "| section | measurement | value | notes |", "|---|---|---|---|"]
        for r in self.rows:
            lines.append(f"| {r.section} | {cell(r.item)} | {cell(r.value)} | {cell(r.note)} |")
        return "\n".join(lines) + "\n"


def describe_device() -> str:
    d = jax.devices()[0]
    return (f"{d.device_kind} ({jax.default_backend()}, {jax.device_count()} device(s), 1 used), jax {jax.__version__}"
            f", {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")


class SectionTimeout(Exception):
    """A section ran past its time budget."""


@contextlib.contextmanager
def alarm(seconds: float) -> Iterator[None]:
    """Raise `SectionTimeout` in the main thread after `seconds` (POSIX; elsewhere no limit)."""
    if not hasattr(signal, "setitimer"):
        yield
        return

    def fire(signum, frame):
        raise SectionTimeout(f"over its time budget of {seconds:g} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def run_section(report: Report, key: str, fn: Callable[[Report, bool], None], quick: bool, budget_s: float) -> None:
    """`fn(report, quick)` under its time budget; an exception becomes an error row (its rows so far are kept)."""
    t0 = time.perf_counter()
    log(f"section {key} ({TITLES[key]}): start, budget {budget_s:.0f} s")
    try:
        with alarm(budget_s), contextlib.redirect_stdout(sys.stderr):  # the loop's progress lines: stderr too
            fn(report, quick)
    except Exception as e:  # noqa: BLE001 - one failing section must not lose the others' rows
        log(f"section {key} failed:\n{traceback.format_exc()}")
        report.add(key, f"{TITLES[key]}: error", "error", f"{type(e).__name__}: {str(e).strip()[:400]}")
    finally:
        compile_lib.clear_cache()  # cached steps and frozen text-encoder params of the section
        gc.collect()
        jax.clear_caches()
    log(f"section {key}: done in {time.perf_counter() - t0:.1f} s")


def _fmt(x: float) -> str:
    return f"{x:.2e}"


# ------------------------------------------------------------------------------------------------- scenes and ids


def scene_ids(t: int, h: int, w: int, objects: int = 3) -> np.ndarray:
    """int32 `[1, t*h*w]` ids in `(t, h, w)` order: the largest segment (background, id 0: the left half of every
    frame) holds half the tokens, `objects` objects split the right half into horizontal bands."""
    ids = np.zeros((t, h, w), np.int32)
    half = w // 2
    bands = np.array_split(np.arange(h), objects)
    for k, rows in enumerate(bands, start=1):
        ids[:, rows, half:] = k
    return ids.reshape(1, -1)


def local_ids(slots: int, lp: int) -> np.ndarray:
    """int32 `[1, slots*lp]` local-prompt ids: slot s has `lp//2 + s` real tokens (id s, capped at lp), the rest -1."""
    mask = np.zeros((1, slots, lp), bool)
    for s in range(slots):
        mask[0, s, : min(lp, lp // 2 + s)] = True
    return np.asarray(masks_lib.local_prompt_ids(jnp.asarray(mask)))


# --------------------------------------------------------------------------------------------- (a) kernels vs xla


def _attention_fn(impl: str, self_attention: bool, interpret: bool, q_ids: jax.Array, kv_ids: jax.Array):
    """`(q, k, v, ct) -> (out, dq, dk, dv)` jitted, through `dot_product_attention` with `impl`."""

    def fn(q, k, v, ct):
        def attend(q, k, v):
            if self_attention:  # kv_ids=None: self-attention, the identity impl="gpu" recognises
                return attention_lib.dot_product_attention(q, k, v, q_ids=q_ids, impl=impl, interpret=interpret)
            return attention_lib.dot_product_attention(q, k, v, q_ids=q_ids, kv_ids=kv_ids, impl=impl,
                                                       interpret=interpret)

        out, vjp = jax.vjp(attend, q, k, v)
        return (out, *vjp(ct.astype(out.dtype)))

    return jax.jit(fn)


def _max_err(a: tuple[jax.Array, ...], b: tuple[jax.Array, ...]) -> float:
    return max(float(jnp.max(jnp.abs(x.astype(jnp.float32) - y.astype(jnp.float32))))
               for x, y in zip(a, b, strict=True))


def kernel_errors(impl: str, kind: str, dtype: str, shape: dict[str, int], interpret: bool) -> dict[str, float]:
    """Max abs errors of `impl` (and of xla in the same dtype) against xla in fp32 at the highest precision."""
    b, h, d = 1, shape["heads"], shape["head_dim"]
    ids = jnp.asarray(scene_ids(*shape["grid"]))
    lq = ids.shape[1]
    if kind == "self":
        q_ids, kv_ids, lk = ids, ids, lq
    else:
        kv_ids = jnp.asarray(local_ids(shape["slots"], shape["lp"]))
        lk = kv_ids.shape[1]
        q_ids = masks_lib.sanitize_query_ids(ids, kv_ids)
    rng = np.random.default_rng(0)
    dt = jnp.dtype(dtype)
    q, k, v = (jnp.asarray(rng.standard_normal((b, n, h, d)), jnp.float32).astype(dt) for n in (lq, lk, lk))
    ct = jnp.asarray(rng.standard_normal((b, lq, h, d)), jnp.float32)
    self_attention = kind == "self"
    with jax.default_matmul_precision("highest"):
        ref = _attention_fn("xla", self_attention, False, q_ids, kv_ids)(
            *(x.astype(jnp.float32) for x in (q, k, v)), ct)
    got = _attention_fn(impl, self_attention, interpret, q_ids, kv_ids)(q, k, v, ct)
    xla_same = _attention_fn("xla", self_attention, False, q_ids, kv_ids)(q, k, v, ct)
    return {"out": _max_err(got[:1], ref[:1]), "grad": _max_err(got[1:], ref[1:]),
            "xla_out": _max_err(xla_same[:1], ref[:1]), "xla_grad": _max_err(xla_same[1:], ref[1:]),
            "lq": lq, "lk": lk}


def section_kernels(report: Report, quick: bool) -> None:
    backend = jax.default_backend()
    interpret = backend not in ("gpu", "cuda", "tpu")
    if quick:
        shape = {"grid": (2, 6, 8), "heads": 2, "head_dim": 32, "slots": 5, "lp": 4}
    else:  # 3 latent frames of the real 30x52 grid: 4,680 tokens (not a multiple of 128: padding is exercised)
        shape = {"grid": (3, 30, 52), "heads": 12, "head_dim": 128, "slots": 5, "lp": 32}
    impls = device_impl(backend)[:1] if quick else device_impl(backend)  # --quick on CPU: gpu only (interpret)
    for impl in impls:
        for kind in ("self", "cross"):
            for dtype in ("bfloat16", "float32"):
                name = f"masked {kind}-attn, {impl}{' (interpret)' if interpret else ''}, {dtype}"
                t0 = time.perf_counter()
                try:
                    e = kernel_errors(impl, kind, dtype, shape, interpret)
                except Exception as ex:  # noqa: BLE001 - e.g. a dtype the kernel does not support: one row
                    report.add("a", f"{name}: max abs err (out / grad)", "error",
                               f"{type(ex).__name__}: {str(ex).strip()[:300]}")
                    continue
                tol = TOLERANCE[dtype]
                ok = "ok" if max(e["out"], e["grad"]) <= tol else "ABOVE TOLERANCE"
                path = ""
                if kind == "cross" and impl == "gpu":
                    path = "; gpu cross-attn runs cuDNN (bf16) / XLA (fp32) with a boolean mask, by design"
                report.add("a", f"{name}: max abs err (out / grad)", f"{_fmt(e['out'])} / {_fmt(e['grad'])}",
                           f"Lq {e['lq']}, Lk {e['lk']}, {shape['heads']}x{shape['head_dim']} heads; vs xla fp32 "
                           f"(highest); xla {dtype}: {_fmt(e['xla_out'])} / {_fmt(e['xla_grad'])}; tol {tol:g}: {ok}"
                           f"{path}; {time.perf_counter() - t0:.1f} s")


# ------------------------------------------------------------------------------------- (b) object-sparse attention


def find_sparse() -> tuple[Any, Any, str]:
    """This checkout's object-sparse masked self-attention: `(op(q, k, v, prepared), prepare(ids), how)`, or
    `(None, None, why)` when there is none (`ttm_jax/models/sparse_attention.py`: `masked_self_attention(q, k, v,
    sort)`, `sort_objects(ids)`, done once per forward pass by the DiT)."""
    try:
        mod = importlib.import_module("ttm_jax.models.sparse_attention")
    except ImportError as e:
        return None, None, f"no object-sparse path in this checkout (ttm_jax.models.sparse_attention: {e})"
    op = getattr(mod, "masked_self_attention", None)
    if not callable(op):
        return None, None, "ttm_jax.models.sparse_attention has no masked_self_attention(q, k, v, ids)"
    params = list(inspect.signature(op).parameters)
    if len(params) < 4:
        return None, None, f"sparse_attention.masked_self_attention{tuple(params)}: expected (q, k, v, ids, ...)"
    sort = getattr(mod, "sort_objects", None)
    if callable(sort):
        return op, sort, "sparse_attention.masked_self_attention, ids sorted once (sort_objects) outside the timing"
    return op, (lambda ids: ids), "sparse_attention.masked_self_attention on the ids"


def _time_fn(fn: Callable[[], Any], repeats: int, max_s: float = 10.0) -> tuple[float, int]:
    """(best seconds of `fn()` (blocked), runs) over up to `repeats` runs after one warm-up run (load from other
    processes only ever adds time); fewer runs when the warm-up says they would take more than `max_s`."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    warm = time.perf_counter() - t0
    times = []
    for _ in range(max(1, min(repeats, int(max_s / max(warm, 1e-9))))):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return min(times), len(times)


def section_sparse(report: Report, quick: bool) -> None:
    backend = jax.default_backend()
    sparse, prepare, how = find_sparse()
    if sparse is None:
        report.add("b", "object-sparse masked self-attn speed-up", "not available", how)
        return
    interpret = backend not in ("gpu", "cuda", "tpu")
    dense_impl = model_impl(backend)
    grid, heads, head_dim, dtype = ((2, 6, 8), 2, 32, jnp.float32) if quick else ((21, 30, 52), 12, 128, jnp.bfloat16)
    ids_np = scene_ids(*grid)
    counts = np.bincount(ids_np.ravel())
    ideal = ids_np.size**2 / float(np.sum(counts.astype(np.float64) ** 2))
    ids = jnp.asarray(ids_np)
    n = ids.shape[1]
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((1, n, heads, head_dim)), jnp.float32).astype(dtype)
               for _ in range(3))


    def dense(q, k, v, ids):
        return attention_lib.dot_product_attention(q, k, v, q_ids=ids, impl=dense_impl, interpret=False)

    # the sparse op with the backend's kernel (splash on TPU, the Pallas kernel on GPU) and with the XLA block loop
    takes_impl = "impl" in inspect.signature(sparse).parameters
    impls = list(dict.fromkeys([dense_impl, "xla"])) if takes_impl else [None]
    fns = {"dense": (dense, ids)}
    for impl in impls:  # each kernel with the sort (block sizes) made for it, outside the timing
        name = "sparse" if impl is None else f"sparse {impl}"
        prepared = jax.block_until_ready(prepare(ids) if impl is None else prepare(ids, impl=impl))
        fns[name] = ((lambda q, k, v, s, impl=impl: sparse(q, k, v, s, impl=impl)) if impl else sparse, prepared)
    fwd = {name: jax.jit(f) for name, (f, _) in fns.items()}
    grad = {name: jax.jit(jax.grad(lambda q, k, v, s, f=f: jnp.sum(f(q, k, v, s).astype(jnp.float32) * q[..., :1]),
                                   argnums=(0, 1, 2))) for name, (f, _) in fns.items()}
    repeats = 3 if quick else 5
    where = f"{n} tokens, {heads}x{head_dim} heads, {jnp.dtype(dtype).name}, segments {counts.tolist()}"
    want = fwd["dense"](q, k, v, ids).astype(jnp.float32)
    want_g = grad["dense"](q, k, v, ids)
    for name, (_, arg) in fns.items():
        if name == "dense":
            continue
        err = float(jnp.max(jnp.abs(fwd[name](q, k, v, arg).astype(jnp.float32) - want)))
        err_g = max(float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
                    for a, b in zip(grad[name](q, k, v, arg), want_g, strict=True))
        report.add("b", f"{name} vs dense: max abs diff, values / gradients", f"{_fmt(err)} / {_fmt(err_g)}", where)
        for label, table in (("forward", fwd), ("forward+backward", grad)):
            (t_dense, r_dense), (t_sparse, r_sparse) = (
                _time_fn(functools.partial(table[m], q, k, v, a), repeats) for m, a in (("dense", ids), (name, arg)))
            report.add("b", f"{name} vs dense masked self-attn ({dense_impl}), {label}: speed-up",
                       f"{t_dense / t_sparse:.2f}x",
                       f"best of {r_dense} / {r_sparse} runs: {t_dense * 1e3:.2f} ms dense vs {t_sparse * 1e3:.2f} ms "
                       f"sparse ({how}); {where}; ideal {ideal:.2f}x"
                       + ("; CPU timings of tiny shapes, not a measurement" if interpret else ""))


# ------------------------------------------------------------------------------------------ (c) wan1.3b train step


@dataclasses.dataclass(frozen=True)
class LatentsOnly:
    """The autoencoder's geometry without weights: the step reads cached latents, so encode/decode never run."""

    time_factor: int
    space_factor: int
    latent_channels: int

    def encode(self, video: jax.Array) -> jax.Array:
        raise RuntimeError("bench/accelerator.py: the train step was fed latents; the autoencoder must not run")

    decode = encode


def step_config(quick: bool, backend: str) -> Any:
    """wan1.3b stage 2 (tiny at 5x16x16 with --quick): batch 1, bf16 compute, full remat, the backend's kernel."""
    c = config_lib.build(2, "tiny" if quick else "wan1.3b")
    if quick:
        c.data.update(num_frames=5, height=16, width=16)
        c.train.compiler_options = {"xla_backend_optimization_level": 0}  # fast CPU compiles (as runlocal)
    c.model.update(attention=model_impl(backend), dtype="bfloat16", param_dtype="float32", remat_policy="full",
                   scan_layers=True)
    c.train.batch_size = 1
    c.mesh.distributed = "skip"
    c.mesh.shape = {"data": 1, "fsdp": 1, "tensor": 1}
    return config_lib.validate(c)


def synthetic_latent_batch(c: Any, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A stage-2 batch as `config.data.cached` training gets it (CONTRIBUTING.md "Batches", `data/loader.py`): cached
    latents and text embeddings (padding zeroed), object masks (boxes), token ids and masks (only their masks and
    shapes are read when the embeddings are there)."""
    d, t = c.data, c.text_encoder
    lt, lh, lw, ch = config_lib.latent_shape(c)
    k, f, h, w = int(d.max_objects), int(d.num_frames), int(d.height), int(d.width)
    masks = np.zeros((1, f, h, w, k), bool)
    for j in range(k):  # objects in bands of the right half, background the left half
        masks[:, :, j * h // k:(j + 1) * h // k, w // 2:, j] = True
    lc, lp = int(t.max_length), int(t.local_max_length)

    def tokens(shape, real):
        mask = np.zeros(shape, bool)
        mask[..., :real] = True
        return np.where(mask, rng.integers(3, 200, size=shape), 0).astype(np.int32), mask

    cap, cap_m = tokens((1, lc), min(lc, 64))
    loc, loc_m = tokens((1, k + 1, lp), min(lp, 12))
    dim = int(t.d_model)

    def embedding(mask):
        return (rng.standard_normal((*mask.shape, dim)) * mask[..., None]).astype(np.float32)

    return {"caption_embedding": embedding(cap_m), "local_embedding": embedding(loc_m),
            "video_latent": rng.standard_normal((1, lt, lh, lw, ch)).astype(np.float32),
            "trajectory_latent": rng.standard_normal((1, lt, lh, lw, ch)).astype(np.float32),
            "object_masks": masks, "num_objects": np.full((1,), k, np.int32),
            "caption_tokens": cap, "caption_mask": cap_m, "local_tokens": loc, "local_mask": loc_m}


def dit_train_flops(c: Any) -> float:
    """Model FLOPs of one DiT train step (3x the forward; per batch): every matmul of the blocks, the TTM layers, the
    patch and text embedders and the head; attention as 4 N Lk d per layer (masked attention counted dense); no remat
    recompute, no optimizer, no text encoder."""
    m = c.model
    d, layers, ffn, ttm = int(m.dim), int(m.num_layers), int(m.ffn_dim), int(m.ttm_layers)
    pv = math.prod(int(p) for p in m.patch_size)
    lt, lh, lw, ch = config_lib.latent_shape(c)
    n = lt * lh * lw // pv
    lc = int(c.text_encoder.max_length)
    ll = (int(c.data.max_objects) + 1) * int(c.text_encoder.local_max_length)

    def mm(rows: int, i: int, o: int) -> float:
        return 2.0 * rows * i * o

    def attn(lq: int, lk: int) -> float:
        return 4.0 * lq * lk * d

    block = (4 * mm(n, d, d) + attn(n, n)  # self-attention
             + 2 * mm(n, d, d) + 2 * mm(lc, d, d) + attn(n, lc)  # cross-attention to the caption
             + 2 * mm(n, d, ffn))  # FFN
    added = (4 * mm(n, d, d) + attn(n, n)  # masked self-attention
             + 2 * mm(n, d, d) + 2 * mm(ll, d, d) + attn(n, ll))  # masked cross-attention to the local prompts
    edges = (mm(n, config_lib.in_channels(c) * pv, d) + mm(n, d, ch * pv)
             + mm(lc + ll, int(m.text_dim), d) + mm(lc + ll, d, d))
    return 3.0 * (layers * block + ttm * added + edges) * int(c.train.batch_size)


def _step_modules(c: Any) -> Modules:
    """The DiT; the text encoder as a module only (no parameters: the batch carries embeddings); no tokenizer."""
    a = c.autoencoder
    return Modules(model=registry.build_backbone(c), text_encoder=registry.text_encoder(c).build(c.text_encoder),
                   autoencoder=LatentsOnly(int(a.time_factor), int(a.space_factor), int(a.latent_channels)),
                   tokenizer=None)


def empty_text(c: Any, mesh: jax.sharding.Mesh) -> tuple[dict[str, jax.Array], dict[str, Any]]:
    """The frozen inputs of cached-text training (`frozen.init_frozen(..., cached=True)`'s keys, no text encoder):
    the empty prompt's embeddings `[1, Lc, d]`, `[1, Lp, d]` (random here) and its local mask `[1, Lp]` (one token,
    as the tokenizer's end-of-sequence)."""
    t = c.text_encoder
    lc, lp, dim = int(t.max_length), int(t.local_max_length), int(t.d_model)
    mask = np.zeros((1, lp), bool)
    mask[0, 0] = True
    rng = np.random.default_rng(1)
    host = {"empty_context": np.zeros((1, lc, dim), np.float32),
            "empty_local_context": (rng.standard_normal((1, lp, dim)) * mask[..., None]).astype(np.float32),
            "empty_local_mask": mask}
    host["empty_context"][0, 0] = rng.standard_normal(dim)
    rep = sharding_lib.replicated(mesh)
    return {k: jax.device_put(v, rep) for k, v in host.items()}, {k: rep for k in host}


def _cost_flops(compiled: Any) -> float | None:
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - some backends have none
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    if not cost or "flops" not in cost:
        return None
    return float(cost["flops"])


def section_step(report: Report, quick: bool) -> None:
    backend = jax.default_backend()
    device = jax.devices()[0]
    c = step_config(quick, backend)
    lt, lh, lw, _ = config_lib.latent_shape(c)
    pv = math.prod(int(p) for p in c.model.patch_size)
    tokens = lt * lh * lw // pv
    what = (f"{c.variant} stage 2, {c.data.num_frames}x{c.data.height}x{c.data.width} ({tokens:,} tokens), batch 1, "
            f"bf16, remat {c.model.remat_policy}, attention {c.model.attention}")
    log(f"c: {what}")
    modules = _step_modules(c)
    mesh = mesh_lib.make_mesh(c.mesh, [device])
    rules = sharding_lib.rules_from_config(c.mesh)
    tx = state_lib.make_optimizer(c.optim, c.train.total_steps)
    t0 = time.perf_counter()
    options = compile_lib.compiler_options(c)
    state, shardings = state_lib.init_state(params_lib.make_init_params(c, modules), jax.random.PRNGKey(0), tx, 0.0,
                                            mesh, rules, compiler_options=options)
    frozen, frozen_sh = empty_text(c, mesh)
    params = state_lib.param_count(state.params)
    local = synthetic_latent_batch(c, np.random.default_rng(0))
    bsh = step_lib.batch_shardings(local, mesh)
    batch = step_lib.global_batch(local, bsh)
    jax.block_until_ready((state, frozen, batch))
    t_init = time.perf_counter() - t0
    log(f"c: state ({params:,} params) and inputs in {t_init:.1f} s; compiling")
    train_step = step_lib.make_train_step(c, modules, tx, mesh, rules, shardings, frozen_sh, bsh)
    t0 = time.perf_counter()
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        compiled = train_step.jitted.lower(state, frozen, batch).compile(compiler_options=options)
    t_compile = time.perf_counter() - t0
    log(f"c: compiled in {t_compile:.1f} s")

    def one(s):
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            s, m = compiled(s, frozen, batch)
        jax.block_until_ready(m["loss"])
        return s, m

    t0 = time.perf_counter()
    state, m = one(state)  # warm-up
    t_first = time.perf_counter() - t0
    steps = 2 if quick else 3
    times, losses = [], [float(m["loss"])]
    for _ in range(steps):
        t0 = time.perf_counter()
        state, m = one(state)
        times.append(time.perf_counter() - t0)
        losses.append(float(m["loss"]))
    sec = statistics.median(times)
    rate = 1.0 / sec
    report.add("c", "train step: steps/s", f"{rate:.3f}",
               f"{what}; median of {steps} timed steps after compile + 1 warm-up step ({sec:.2f} s/step; warm-up "
               f"{t_first:.1f} s); {params:,} trainable params; init {t_init:.0f} s, compile {t_compile:.0f} s; "
               f"losses {', '.join(f'{x:.3f}' for x in losses)}")
    model_flops = dit_train_flops(c)
    cost = _cost_flops(compiled)
    peak = peak_tflops(device.device_kind)
    if peak is None:
        report.add("c", "MFU (model FLOPs / bf16 peak)", "n/a",
                   f"no bf16 peak for device kind {device.device_kind!r} (PEAK_BF16_TFLOPS); model FLOPs "
                   f"{model_flops:.3e}/step = {model_flops * rate / 1e12:.3f} TFLOP/s achieved")
    else:
        name, tflops = peak
        report.add("c", "MFU (model FLOPs / bf16 peak)", f"{100 * model_flops * rate / (tflops * 1e12):.1f}%",
                   f"peak used: {name} {tflops:g} TFLOP/s bf16 dense; model FLOPs {model_flops:.3e}/step "
                   f"(dit_train_flops: 3x forward matmuls + attention, masked attention dense, no remat) = "
                   f"{model_flops * rate / 1e12:.1f} TFLOP/s")
    if cost is None:
        report.add("c", "compiled step FLOPs (cost analysis)", "n/a", "cost_analysis() gave no flops")
    else:
        util = "" if peak is None else f"; {100 * cost * rate / (peak[1] * 1e12):.1f}% of peak"
        report.add("c", "compiled step FLOPs (cost analysis)", f"{cost:.3e}",
                   f"{cost / model_flops:.2f}x the model FLOPs (remat recompute and optimizer in; "
                   f"custom-call attention kernels count 0){util}")
    stats = device.memory_stats() or {}
    mem = compiled.memory_analysis()
    planned = None
    if mem is not None:
        planned = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
                   - mem.alias_size_in_bytes) / GIB
    planned_s = "n/a" if planned is None else f"{planned:.2f} GiB"
    if "peak_bytes_in_use" in stats:
        limit = stats.get("bytes_limit")
        report.add("c", "peak device memory", f"{stats['peak_bytes_in_use'] / GIB:.2f} GiB",
                   "memory_stats()['peak_bytes_in_use'], the process' peak so far (earlier sections included)"
                   + (f" of {limit / GIB:.1f} GiB" if limit else "") + f"; XLA planned for the step {planned_s}")
    else:
        report.add("c", "peak device memory", f"planned {planned_s}",
                   f"no memory_stats() on {device.platform}; XLA's planned peak of the compiled step (arguments + "
                   f"outputs + temporaries - aliases)")


# ----------------------------------------------------------------------------------------------- (d) end to end


def e2e_config(quick: bool, backend: str, impl: str) -> Any:
    """The tiny stage-2 config at `runlocal` size, a few more steps on an accelerator."""
    c = config_lib.build(2, "tiny,runlocal")
    c.mesh.distributed = "skip"
    c.mesh.shape = {"data": 1, "fsdp": 1, "tensor": 1}
    c.model.attention = impl
    c.train.tensorboard = False
    steps = 4 if quick else 20
    c.train.update(total_steps=steps, checkpoint_every_steps=steps, sample_every_steps=steps, log_every_steps=1)
    c.data.synthetic_num_videos = 4 if quick else 8
    if backend != "cpu":
        c.train.compiler_options = {}  # runlocal's option is for fast CPU compiles
    return config_lib.validate(c)


def section_e2e(report: Report, quick: bool) -> None:
    backend = jax.default_backend()
    impls = [model_impl(backend)] + (["xla"] if model_impl(backend) != "xla" else [])
    for i, impl in enumerate(impls):
        root = tempfile.mkdtemp(prefix="ttm_accel_")
        try:
            c = e2e_config(quick, backend, impl)
            t0 = time.perf_counter()
            result = loop_lib.train(c, os.path.join(root, "workdir"), devices=jax.devices()[:1])
            seconds = time.perf_counter() - t0
            hist = result.history
            first, last = hist[0][1]["loss"], hist[-1][1]["loss"]
            samples = sorted((p for p in os.listdir(os.path.join(root, "workdir", "samples")) if p.endswith(".mp4")),
                             key=str) if os.path.isdir(os.path.join(root, "workdir", "samples")) else []
            sizes = [os.path.getsize(os.path.join(root, "workdir", "samples", p)) for p in samples]
            report.add("d", f"tiny train + sample ({impl}): loss first -> last step", f"{first:.4f} -> {last:.4f}",
                       f"ran: {result.final_step - result.start_step} steps of tiny stage 2 (runlocal size, batch "
                       f"{c.train.batch_size}, {c.data.num_frames}x{c.data.height}x{c.data.width}) through "
                       f"loop.train on synthetic SA-V (Grain), checkpoints at {result.checkpoint_steps}, "
                       f"{len(samples)} sample mp4(s) written ({', '.join(f'{s} B' for s in sizes)}) by the loop's "
                       f"sampler ({c.sample.num_steps} steps); {seconds:.0f} s")
            if not samples:
                raise RuntimeError("the loop wrote no sample mp4")
            return
        except SectionTimeout:
            raise
        except Exception as e:  # noqa: BLE001 - the accelerated kernel failing in the loop: try the reference
            if i == len(impls) - 1:
                raise
            log(f"d: with attention={impl} failed:\n{traceback.format_exc()}")
            report.add("d", f"tiny train + sample ({impl}): error", "error",
                       f"{type(e).__name__}: {str(e).strip()[:300]}; retrying with attention=xla")
        finally:
            shutil.rmtree(root, ignore_errors=True)


# ------------------------------------------------------------------------------------- (e) context parallelism


def context_cases(n: int, quick: bool) -> tuple[tuple[int, int, int], int, int, Any]:
    """(latent grid, heads, head size, dtype) of section (e) for `n` devices: heads a multiple of n (Ulysses)."""
    grid, heads, head_dim, dtype = ((2, 4, 8), 8, 16, jnp.float32) if quick else ((3, 30, 52), 16, 128, jnp.bfloat16)
    heads = -(-heads // n) * n
    return grid, heads, head_dim, dtype


def section_context(report: Report, quick: bool) -> None:
    n = jax.device_count()
    if n < 2:
        report.add("e", "context-parallel attention", "skipped",
                   f"one {jax.default_backend()} device: the sequence has nothing to be split over (needs >= 2; on "
                   f"CPU, XLA_FLAGS=--xla_force_host_platform_device_count=8)")
        return
    cp = importlib.import_module("ttm_jax.models.context_parallel")
    sparse_lib = importlib.import_module("ttm_jax.models.sparse_attention")
    grid, heads, head_dim, dtype = context_cases(n, quick)
    ids_np = scene_ids(*grid)
    length = ids_np.shape[1]
    if length % n:
        report.add("e", "context-parallel attention", "skipped", f"{length} tokens do not split over {n} devices")
        return
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("context",), axis_types=(jax.sharding.AxisType.Auto,))
    one = jax.devices()[0]
    rng = np.random.default_rng(0)
    q, k, v, ct = (jnp.asarray(rng.standard_normal((1, length, heads, head_dim)), jnp.float32).astype(dtype)
                   for _ in range(4))
    ids = jnp.asarray(ids_np)
    sort = sparse_lib.sort_objects(ids, impl="xla")
    where = f"{length} tokens, {heads}x{head_dim} heads, {jnp.dtype(dtype).name}, context={n}"

    def vjp_fn(attend):
        def fn(q, k, v, ct):
            out, back = jax.vjp(attend, q, k, v)
            return (out, *back(ct.astype(out.dtype)))
        return jax.jit(fn)

    repeats = 3 if quick else 5
    for kind, q_ids in (("plain", None), ("masked", ids), ("sparse", sort)):
        # the single-device reference: the dense masked xla op on one device (the sparse path's too)
        ref_ids = None if kind == "plain" else ids
        ref = vjp_fn(lambda q, k, v, i=ref_ids: attention_lib.dot_product_attention(q, k, v, q_ids=i, impl="xla"))
        local = [jax.device_put(x, one) for x in (q, k, v, ct)]
        want = jax.device_get(ref(*local))
        t_ref, _ = _time_fn(functools.partial(ref, *local), repeats)
        for impl in cp.IMPLS:
            fn = vjp_fn(lambda q, k, v, impl=impl, i=q_ids: cp.CONTEXT_IMPLS[impl](q, k, v, mesh=mesh, q_ids=i))
            got = fn(q, k, v, ct)
            t_cp, runs = _time_fn(functools.partial(fn, q, k, v, ct), repeats)
            report.add("e", f"{impl} {kind} self-attn vs one device: max abs diff, values / gradients",
                       f"{_fmt(_max_err(got[:1], want[:1]))} / {_fmt(_max_err(got[1:], want[1:]))}",
                       f"{where}; fwd+bwd {t_cp * 1e3:.2f} ms on {n} devices vs {t_ref * 1e3:.2f} ms on one "
                       f"(xla, dense mask), best of {runs}"
                       + ("; CPU timings of tiny shapes, not a measurement" if jax.default_backend() == "cpu" else ""))


# ------------------------------------------------------------------------------------------------------------ main

SECTION_FNS: dict[str, Callable[[Report, bool], None]] = {
    "a": section_kernels, "b": section_sparse, "c": section_step, "d": section_e2e, "e": section_context}


def parse_only(only: str) -> list[str]:
    keys = [k.strip().lower() for k in only.split(",") if k.strip()]
    bad = [k for k in keys if k not in SECTIONS]
    if bad or not keys:
        raise SystemExit(f"bench/accelerator.py: --only={only!r}: choose a comma-separated subset of {SECTIONS}")
    return [k for k in SECTIONS if k in keys]


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny shapes everywhere (CPU, the test)")
    ap.add_argument("--only", default=",".join(SECTIONS), help="sections to run, e.g. a,c")
    ap.add_argument("--out", default="", help="also write the table to this markdown file")
    args = ap.parse_args(argv)
    sections = parse_only(args.only)
    t0 = time.perf_counter()
    report = Report(describe_device())
    log(f"device: {report.device}; sections {','.join(sections)}{' (quick)' if args.quick else ''}")
    budgets = BUDGET_QUICK_S if args.quick else BUDGET_S
    total = sum(budgets.values()) if args.quick else TOTAL_BUDGET_S
    for key in sections:
        left = total - (time.perf_counter() - t0)
        if left < 10:
            report.add(key, f"{TITLES[key]}: skipped", "skipped", f"the script's {total} s budget is spent")
            continue
        run_section(report, key, SECTION_FNS[key], args.quick, min(budgets[key], left))
    report.add("-", "total wall time", f"{time.perf_counter() - t0:.0f} s",
               "--quick: tiny shapes, not a measurement" if args.quick else "")
    table = report.markdown()
    print(table, flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table)
        log(f"wrote {args.out}")
    return table


if __name__ == "__main__":
    main()
