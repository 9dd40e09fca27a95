"""Training throughput and memory, all measured in one run on this machine.

    python bench/train.py [--variants tiny,mid] [--steps 3] [--rounds 3] [--stage 2] [--skip_torch] [--skip_fsdp]

Three tables:

  1. the full JAX train step (`ttm_jax.train.step`: frozen T5 on the prompts, the autoencoder on uint8 clips,
     rectified flow, DiT forward + backward, AdamW) of each variant on one CPU device: steps/s (best and median of
     `--steps` timed steps after a compile + warm-up step) and the peak memory XLA plans for the step (arguments +
     outputs + temporaries - donated aliases, `compiled.memory_analysis()`), plus the process' peak RSS so far (the
     variants run smallest first);
  2. the same backbone in JAX and in PyTorch (diffusers `WanTransformer3DModel`, same dim / layers / heads / FFN /
     channels / text dim / patch, same latent and caption shapes, fp32): forward + MSE + backward + AdamW (both update
     in place: the JAX step donates params and optimizer state), steps/s of each and the JAX / PyTorch ratio (both on
     this CPU, PyTorch with its default threads). The two are timed interleaved, `--rounds` rounds of `--steps` steps
     each, so that a load from other jobs on a shared machine hits both alike; best-of and median over all steps;
  3. per-device params + AdamW state of the `mid` variant on 1 device against 8 simulated devices with FSDP
     (mesh data=1, fsdp=8): bytes of the state arguments of the compiled step (`memory_analysis`) per device, and the
     1 / 8 ratio (ideal 8; replicated leaves such as norms and biases that fsdp does not divide keep it lower).

Absolute figures depend on the machine and its load; the ratios, measured in the same run, are the result. Each table
prints the 1-minute load average before and after it and warns when it is above 0.5 (another job shares the CPU:
PyTorch's threads slow down more than XLA's under load, so the ratio is then not the idle machine's). The 8 simulated
devices are made only for table 3: with `--skip_fsdp` the process has one CPU device, so tables 1 and 2 never run
with XLA's host platform split into 8.
"""

from __future__ import annotations

import os
import sys

if "--skip_fsdp" not in sys.argv[1:]:  # table 3 needs 8 devices; tables 1-2 alone run on the one real CPU device
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import functools  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout, uninstalled

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from ttm_jax import config as config_lib  # noqa: E402
from ttm_jax.assembly import frozen as frozen_lib
from ttm_jax.assembly import modules as modules_lib
from ttm_jax.assembly import params as params_lib
from ttm_jax.runtime import mesh as mesh_lib  # noqa: E402
from ttm_jax.runtime import sharding as sharding_lib  # noqa: E402
from ttm_jax.train import state as state_lib  # noqa: E402
from ttm_jax.train import step as step_lib  # noqa: E402

MB = 2.0**20


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def synthetic_batch(config, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A batch in the pipeline's contract (CONTRIBUTING.md) with random content."""
    d, t, b = config.data, config.text_encoder, int(config.train.batch_size)
    f, h, w, k = d.num_frames, d.height, d.width, d.max_objects
    masks = np.zeros((b, f, h, w, k), bool)
    for j in range(k):  # one box per object, side by side
        y, x = (j * h) // (2 * k), j * w // (k + 1)
        masks[:, :, y:y + h // 4, x:x + w // 4, j] = True
    lc, lp = int(t.max_length), int(t.local_max_length)

    def tokens(shape, real):
        ids = rng.integers(3, 200, size=shape).astype(np.int32)
        mask = np.zeros(shape, bool)
        mask[..., :real] = True
        return np.where(mask, ids, 0), mask

    cap, cap_m = tokens((b, lc), min(lc, 24))
    mot, mot_m = tokens((b, lc), min(lc, 12))
    loc, loc_m = tokens((b, k + 1, lp), min(lp, 8))
    return {"video": rng.integers(0, 256, (b, f, h, w, 3), dtype=np.uint8),
            "trajectory": rng.integers(0, 256, (b, f, h, w, 3), dtype=np.uint8),
            "object_masks": masks, "num_objects": np.full((b,), k, np.int32),
            "caption_tokens": cap, "caption_mask": cap_m, "motion_tokens": mot, "motion_mask": mot_m,
            "local_tokens": loc, "local_mask": loc_m}


def _planned_peak(compiled) -> tuple[float, float]:
    """(planned peak MiB, argument MiB) per device from XLA's memory analysis."""
    m = compiled.memory_analysis()
    peak = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
    return peak / MB, m.argument_size_in_bytes / MB


def _times(fn, steps: int) -> list[float]:
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def _rates(times: list[float]) -> tuple[float, float]:
    """(best, median) steps/s."""
    return 1.0 / min(times), 1.0 / statistics.median(times)


def bench_full_step(variant: str, stage: int, steps: int) -> dict:
    """Table 1: the full train step of `variant` on one device."""
    c = config_lib.build(stage, variant)
    c.mesh.distributed = "skip"
    modules = modules_lib.build_modules(c)
    devices = jax.devices()[:1]
    mesh = mesh_lib.make_mesh(c.mesh, devices)
    rules = sharding_lib.rules_from_config(c.mesh)
    tx = state_lib.make_optimizer(c.optim, c.train.total_steps)
    init = params_lib.make_init_params(c, modules)
    state, shardings = state_lib.init_state(init, jax.random.PRNGKey(0), tx, 0.0, mesh, rules)
    frozen, frozen_sh = frozen_lib.init_frozen(c, modules, mesh, rules)
    local = synthetic_batch(c, np.random.default_rng(0))
    bsh = step_lib.batch_shardings(local, mesh)
    batch = step_lib.global_batch(local, bsh)
    train_step = step_lib.make_train_step(c, modules, tx, mesh, rules, shardings, frozen_sh, bsh)
    with jax.set_mesh(mesh):
        import flax.linen as nn

        with nn.logical_axis_rules(rules):
            compiled = train_step.jitted.lower(state, frozen, batch).compile()
    peak, _ = _planned_peak(compiled)
    holder = {"state": state}

    def one():
        holder["state"], m = train_step(holder["state"], frozen, batch)
        jax.block_until_ready(m["loss"])

    one()  # compile + warm-up
    best, median = _rates(_times(one, steps))
    return {"variant": variant, "params": state_lib.param_count(state.params), "best": best, "median": median,
            "planned_peak_mb": peak, "rss_mb": _rss_mb(), "batch": int(c.train.batch_size),
            "clip": f"{c.data.num_frames}x{c.data.height}x{c.data.width}"}


def _backbone_shapes(c) -> dict:
    t, h, w, ch = config_lib.latent_shape(c)
    return dict(b=int(c.train.batch_size), t=t, h=h, w=w, c=ch, lc=int(c.text_encoder.max_length),
                text_dim=int(c.model.text_dim))


def backbone_jax(variant: str):
    """Table 2, JAX side: DiT backbone (no added layers) forward + MSE + backward + AdamW; one compiled step."""
    from ttm_jax.backbones.wan import model as dit

    c = config_lib.build(1, variant)
    c.model.ttm_layers = 0  # the plain backbone, as diffusers' (the tiny stage 1 adds TTM layers by default)
    s = _backbone_shapes(c)
    model = dit.DiT(c.model, 3 * s["c"], s["c"])
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((s["b"], s["t"], s["h"], s["w"], 3 * s["c"]), np.float32))
    tt = jnp.asarray(rng.uniform(0, 1000, (s["b"],)).astype(np.float32))
    ctx = jnp.asarray(rng.standard_normal((s["b"], s["lc"], s["text_dim"]), np.float32))
    target = jnp.asarray(rng.standard_normal((s["b"], s["t"], s["h"], s["w"], s["c"]), np.float32))
    params = sharding_lib.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), x[:1], tt[:1], ctx[:1])["params"])
    tx = optax.adamw(1e-4)
    opt = tx.init(params)

    @functools.partial(jax.jit, donate_argnums=(0, 1))  # updated in place, as torch's optimizer and the train step
    def step(params, opt, x, tt, ctx, target):  # inputs as arguments: no constant folding of the batch
        def loss(p):
            return jnp.mean((model.apply({"params": p}, x, tt, ctx) - target) ** 2)

        val, g = jax.value_and_grad(loss)(params)
        upd, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, upd), opt, val

    holder = {"p": params, "o": opt}

    def one():
        holder["p"], holder["o"], v = step(holder["p"], holder["o"], x, tt, ctx, target)
        jax.block_until_ready(v)

    # the compiled step on the current state, for bench/profile_step.py (its HLO names every op's module)
    one.compiled = lambda: step.lower(holder["p"], holder["o"], x, tt, ctx, target).compile()
    one()
    return one


def backbone_torch(variant: str):
    """Table 2, PyTorch side: diffusers WanTransformer3DModel of the same shapes, fp32; one step."""
    import torch
    from diffusers import WanTransformer3DModel

    c = config_lib.build(1, variant)
    s = _backbone_shapes(c)
    m = c.model
    model = WanTransformer3DModel(
        patch_size=tuple(m.patch_size), num_attention_heads=m.num_heads, attention_head_dim=m.dim // m.num_heads,
        in_channels=3 * s["c"], out_channels=s["c"], text_dim=m.text_dim, freq_dim=m.freq_dim, ffn_dim=m.ffn_dim,
        num_layers=m.num_layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=m.eps,
        rope_max_seq_len=m.rope_max_seq_len)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(s["b"], 3 * s["c"], s["t"], s["h"], s["w"], generator=g)
    tt = torch.rand(s["b"], generator=g) * 1000
    ctx = torch.randn(s["b"], s["lc"], s["text_dim"], generator=g)
    target = torch.randn(s["b"], s["c"], s["t"], s["h"], s["w"], generator=g)

    def one():
        out = model(x, tt, ctx, return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(out, target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    one()
    return one


def bench_backbones(variant: str, steps: int, rounds: int) -> dict[str, list[float]]:
    """Table 2: the JAX and PyTorch steps timed interleaved, `rounds` x `steps` each (after a warm-up step)."""
    fns = {"jax": backbone_jax(variant), "torch": backbone_torch(variant)}
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name] += _times(fn, steps)
    return times


def bench_fsdp_memory(variant: str, stage: int) -> dict:
    """Table 3: per-device state bytes of the compiled step on 1 device vs mesh fsdp=8."""
    out = {}
    for n in (1, 8):
        c = config_lib.build(stage, variant)
        c.mesh.distributed = "skip"
        c.mesh.shape.update(data=1, fsdp=n, tensor=1)
        c.train.batch_size = 8
        modules = modules_lib.build_modules(c)
        mesh = mesh_lib.make_mesh(c.mesh, jax.devices()[:n])
        rules = sharding_lib.rules_from_config(c.mesh)
        tx = state_lib.make_optimizer(c.optim, c.train.total_steps)
        init = params_lib.make_init_params(c, modules)
        abstract_boxed = jax.eval_shape(init, jax.random.PRNGKey(0))
        sh = state_lib.state_shardings(abstract_boxed, tx, 0.0, mesh, rules)
        abstract = state_lib.abstract_state(init, jax.random.PRNGKey(0), tx, 0.0, sh)
        # the state alone as the compiled function's arguments: what it costs each device to hold it
        ident = jax.jit(lambda s: jax.tree.map(lambda x: x * 1, s), in_shardings=(sh,), out_shardings=sh,
                        donate_argnums=(0,))
        state_args = ident.lower(abstract).compile().memory_analysis().argument_size_in_bytes / MB
        # and the whole train step's arguments (state + frozen text encoder + this device's rows of the batch)
        frozen, frozen_sh = frozen_lib.init_frozen(c, modules, mesh, rules)
        local = synthetic_batch(c, np.random.default_rng(0))
        bsh = step_lib.batch_shardings(local, mesh)
        batch = jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s), local, bsh)
        train_step = step_lib.make_train_step(c, modules, tx, mesh, rules, sh, frozen_sh, bsh)
        import flax.linen as nn

        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            compiled = train_step.jitted.lower(abstract, frozen, batch).compile()
        peak, args = _planned_peak(compiled)
        out[n] = {"state_mb": state_args, "step_args_mb": args, "step_peak_mb": peak}
    return out


def load_line(when: str) -> str:
    """`load average 0.03 (before table 1)`, with a warning when the 1-minute load is above 0.5."""
    load = os.getloadavg()[0]
    warn = "  WARNING: the machine is not idle; timings and the JAX / PyTorch ratio are not an idle machine's" \
        if load > 0.5 else ""
    return f"load average {load:.2f} ({when}){warn}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default="tiny,mid")
    ap.add_argument("--stage", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3, help="table 2: interleaved rounds of --steps steps per side")
    ap.add_argument("--skip_torch", action="store_true")
    ap.add_argument("--skip_fsdp", action="store_true")
    args = ap.parse_args()
    variants = [v for v in args.variants.split(",") if v]
    print(f"jax {jax.__version__} on {jax.devices()[0].platform} ({os.cpu_count()} cores), stage {args.stage}, "
          f"{args.steps} timed steps after a warm-up")

    print(f"devices: {len(jax.devices())} ({'8 simulated for table 3' if len(jax.devices()) > 1 else 'no simulated'})")
    print("\n1. full train step (T5 + autoencoder + flow + DiT fwd/bwd + AdamW), one device")
    print(load_line("before table 1"), flush=True)
    print(f"{'variant':8s} {'params':>11s} {'batch x clip':>14s} {'steps/s best':>13s} {'median':>7s} "
          f"{'planned peak':>13s} {'peak RSS':>10s}")
    for v in variants:
        r = bench_full_step(v, args.stage, args.steps)
        print(f"{v:8s} {r['params']:11,d} {str(r['batch']) + ' x ' + r['clip']:>14s} {r['best']:13.3f} "
              f"{r['median']:7.3f} {r['planned_peak_mb']:10.1f} MiB {r['rss_mb']:7.0f} MiB", flush=True)
    print(load_line("after table 1"), flush=True)

    if not args.skip_torch:
        print("\n2. backbone train step (fwd + MSE + bwd + AdamW, fp32): JAX DiT vs diffusers WanTransformer3DModel")
        print(f"(interleaved, {args.rounds} rounds x {args.steps} steps each; steps/s best-of / median)")
        print(load_line("before table 2"), flush=True)
        print(f"{'variant':8s} {'JAX best':>9s} {'median':>7s} {'torch best':>11s} {'median':>7s} "
              f"{'JAX / torch best':>17s} {'median':>7s}")
        for v in variants:
            t = bench_backbones(v, args.steps, args.rounds)
            (jb, jm), (tb, tm) = _rates(t["jax"]), _rates(t["torch"])
            print(f"{v:8s} {jb:9.3f} {jm:7.3f} {tb:11.3f} {tm:7.3f} {jb / tb:17.2f} {jm / tm:7.2f}", flush=True)
        print(load_line("after table 2"), flush=True)

    if not args.skip_fsdp:
        v = "mid" if "mid" in variants else variants[-1]
        print(f"\n3. per-device memory of the {v} train state (params + AdamW), compiled memory analysis")
        r = bench_fsdp_memory(v, args.stage)
        print(f"{'devices':8s} {'state/device':>13s} {'step args/device':>17s} {'step peak/device':>17s}")
        for n in (1, 8):
            print(f"{n:<8d} {r[n]['state_mb']:10.2f} MiB {r[n]['step_args_mb']:13.2f} MiB "
                  f"{r[n]['step_peak_mb']:13.2f} MiB")
        print(f"ratio 1 / 8 devices: state {r[1]['state_mb'] / r[8]['state_mb']:.2f}x, "
              f"step arguments {r[1]['step_args_mb'] / r[8]['step_args_mb']:.2f}x, "
              f"step peak {r[1]['step_peak_mb'] / r[8]['step_peak_mb']:.2f}x")


if __name__ == "__main__":
    main()
