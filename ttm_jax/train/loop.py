"""`train(config, workdir)`: the training loop of either TTM stage.

Sections: setup (distributed, mesh, modules, data) -> state (born sharded; resumed from the latest checkpoint of
`workdir` if there is one, with the data iterator at the same position) -> loop (one jitted step per batch; progress and
TensorBoard every `log_every_steps`; Orbax every `checkpoint_every_steps` and at the end; sample mp4s every
`sample_every_steps`) -> clean exit on SIGTERM (save, wait, return).

A run is bounded by `train.total_steps`: running again in the same workdir with a larger value resumes and says from
which step. A non-finite loss stops the run with `FloatingPointError`; a state is only ever checkpointed after its
losses were checked, so the last checkpoint is the last good one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from ttm_jax import config as config_lib
from ttm_jax.assembly import frozen as frozen_lib
from ttm_jax.assembly import inputs as inputs_lib
from ttm_jax.assembly import objectives, registry
from ttm_jax.assembly import params as params_lib
from ttm_jax.assembly.modules import Modules, build_modules
from ttm_jax.data import loader as data_loader
from ttm_jax.data import records, video_io
from ttm_jax.runtime import checkpoint as checkpoint_lib
from ttm_jax.runtime import compile as compile_lib
from ttm_jax.runtime import mesh as mesh_lib
from ttm_jax.runtime import sharding as sharding_lib
from ttm_jax.train import lock as lock_lib
from ttm_jax.train import metrics as metrics_lib
from ttm_jax.train import preemption
from ttm_jax.train import state as state_lib
from ttm_jax.train import step as step_lib

IteratorFactory = Callable[..., Any]


@dataclasses.dataclass
class TrainResult:
    """What a call to `train` did: steps `[start_step, final_step)` ran; `history` holds the logged averages."""

    start_step: int
    final_step: int
    preempted: bool
    history: list[tuple[int, dict[str, float]]]
    state: state_lib.TrainState
    checkpoint_steps: list[int]


@dataclasses.dataclass(frozen=True)
class Run:
    """One training run as `train` settles it before anything is written: the validated config and its workdir, the
    modules and the data factory, the device mesh with its sharding rules, the optimizer, and the train state's init
    function, shardings and abstract shapes (a resume is checked against these before the loop starts). What follows
    from the config alone (`rng`, `ema_decay`, `shard_unannotated`) is read from it, not stored twice."""

    config: ml_collections.ConfigDict
    workdir: str
    modules: Modules
    make_iterator: IteratorFactory
    mesh: jax.sharding.Mesh
    rules: sharding_lib.Rules
    tx: optax.GradientTransformation
    init_params: Callable[[jax.Array], Any]
    shardings: state_lib.TrainState
    abstract: state_lib.TrainState

    @property
    def rng(self) -> jax.Array:
        return _rng(self.config)

    @property
    def ema_decay(self) -> float:
        return float(self.config.optim.ema_decay)

    @property
    def shard_unannotated(self) -> bool:
        return _shard_unannotated(self.config)


def _rng(config: ml_collections.ConfigDict) -> jax.Array:
    return jax.random.PRNGKey(int(config.seed))


def _shard_unannotated(config: ml_collections.ConfigDict) -> bool:
    return bool(config.mesh.shard_unannotated)


def _say(msg: str) -> None:
    logging.info(msg)
    if jax.process_index() == 0:
        print(msg, flush=True)


def default_iterator(config: ml_collections.ConfigDict, *, process_index: int, process_count: int,
                     workdir: str) -> Any:
    """The Grain pipeline (`ttm_jax.data.loader`); on the embedded default (no data path) it first makes the
    synthetic SA-V cache (`ensure_default_data`)."""
    return data_loader.make_train_iterator(config, process_index=process_index, process_count=process_count,
                                             workdir=workdir)


def _load_init_from(path: str, abstract: state_lib.TrainState) -> Any:
    return checkpoint_lib.restore_tree(path, abstract.params, field="config.train.init_from",
                                       fix="it must be an Orbax params checkpoint of this model's shapes (python -m "
                                           "ttm_jax.convert)")


def _sample_dir(workdir: str) -> epath.Path:
    return epath.Path(workdir) / "samples"


def _sampling_fns(config: ml_collections.ConfigDict, modules: Modules, mesh: jax.sharding.Mesh, num: int) -> tuple:
    """The jitted pieces of `write_samples`: `(take the first num rows, conditions, sample, time grid)`."""
    rep = sharding_lib.replicated(mesh)

    def conditions(frozen, rows):
        target, first, cond, text = inputs_lib.prepare(config, modules, frozen, rows)
        return target, inputs_lib.conditions(first, cond, text)

    apply = inputs_lib.model_fn(config, modules)
    objective = objectives.make_objective(config.objective)
    s = config.sample
    ts = jnp.asarray(objective.time_grid(int(s.num_steps), s.schedule, float(s.shift)))
    self_cond = config_lib.self_condition(config)
    sample = jax.jit(lambda n, ts, *a: objectives.sample(objective, apply, n, ts, *a, self_condition=self_cond),
                     out_shardings=rep)
    take = jax.jit(lambda b: {k: v[:num] for k, v in b.items()}, out_shardings=rep)
    return take, jax.jit(conditions, out_shardings=rep), sample, ts


def write_samples(config: ml_collections.ConfigDict, modules: Modules, params: Any,
                  frozen: dict[str, Any], batch: dict[str, jax.Array], step: int, workdir: str,
                  mesh: jax.sharding.Mesh, num: int = 2) -> list[str]:
    """Sample `num` clips (the objective's sampler, `config.sample` grid) conditioned on the first rows of `batch` with
    the current params; write mp4s of `[generated | reference]` side by side to `<workdir>/samples/step_<step>_<i>.mp4`
    (process 0)."""
    num = min(num, next(iter(batch.values())).shape[0])
    # built once per process and run (`compile_lib.cached`): new jit closures every call would compile the sampler
    # anew at every sampling step, and the memory of the old executables is not all given back (bench/soak.py)
    take, conditions, sample, ts = compile_lib.cached(
        compile_lib.cache_key(config, modules, mesh, "write_samples", num),
        lambda: _sampling_fns(config, modules, mesh, num))
    target, conds = conditions(frozen, take(batch))
    noise = jax.random.normal(jax.random.PRNGKey(int(config.sample.seed)), target.shape, jnp.float32)
    latents = sample(noise, ts, params, conds)
    video = modules.autoencoder.decode(latents)
    ref = modules.autoencoder.decode(target)
    to_u8 = lambda v: np.asarray(jnp.clip((v + 1.0) * 127.5, 0, 255).round().astype(jnp.uint8))  # noqa: E731
    video, ref = to_u8(video), to_u8(ref)
    paths = []
    if jax.process_index() == 0:
        out = _sample_dir(workdir)
        out.mkdir(parents=True, exist_ok=True)
        for i in range(num):
            path = out / f"step_{step:07d}_{i}.mp4"
            video_io.write_video(path, np.concatenate([video[i], ref[i]], axis=2), fps=float(config.data.fps))
            paths.append(str(path))
    return paths


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tuple(d) if isinstance(d, list) else d}


def check_resumable(saved: ml_collections.ConfigDict, config: ml_collections.ConfigDict, workdir: str) -> None:
    """Raise naming every field whose change would make the checkpoint in `workdir` unloadable (the fields that fix
    the state's shapes, `registry.state_fields`). A field the saved config predates is not compared."""
    a, b = _flat(saved.to_dict()), _flat(config.to_dict())
    diffs = []
    for field in registry.state_fields(config):
        for k in sorted(set(a) | set(b)):
            if (k == field or k.startswith(field + ".")) and k in a and a.get(k) != b.get(k):
                diffs.append(f"config.{k}: checkpoint {a.get(k)!r}, now {b.get(k)!r}")
    if diffs:
        raise config_lib.ConfigError(f"{workdir}: cannot resume, the config changed what the checkpoint holds: "
                         f"{'; '.join(diffs)}. Resume with the saved config (python -m ttm_jax.main "
                         f"--workdir={workdir}, no --config) or start a new workdir")


def train(config: ml_collections.ConfigDict, workdir: str, *, modules: Modules | None = None,
          make_iterator: IteratorFactory | None = None, devices: list[jax.Device] | None = None) -> TrainResult:
    """Train `config` in `workdir` until `train.total_steps`, resuming from its latest checkpoint.

    `modules`, `make_iterator` and `devices` default to the config's real modules, the Grain pipeline
    (`ttm_jax.data.loader.make_train_iterator`) and all devices; tests pass small stand-ins.
    """
    # --- setup -------------------------------------------------------------------------------------------------------
    config_lib.validate(config)
    if config_lib.self_condition(config):
        objectives.check_self_condition(objectives.make_objective(config.objective))
    mesh_lib.initialize_distributed(config.mesh)
    mesh = mesh_lib.make_mesh(config.mesh, devices)
    rules = sharding_lib.rules_from_config(config.mesh)
    t = config.train
    bp = mesh_lib.batch_parallelism(mesh)
    if int(t.batch_size) % bp or int(t.batch_size) % jax.process_count():
        raise ValueError(f"config.train.batch_size: {t.batch_size} must be divisible by the {bp} batch shards of the "
                         f"mesh {dict(mesh.shape)} and the {jax.process_count()} processes; change it or mesh.shape")
    workdir = str(workdir)
    modules = modules or build_modules(config)
    tx = state_lib.make_optimizer(config.optim, config.train.total_steps)
    ema_decay = float(config.optim.ema_decay)
    init_params = params_lib.make_init_params(config, modules)
    abstract_boxed = jax.eval_shape(init_params, _rng(config))
    shardings = state_lib.state_shardings(abstract_boxed, tx, ema_decay, mesh, rules, _shard_unannotated(config))
    run = Run(config=config, workdir=workdir, modules=modules, make_iterator=make_iterator or default_iterator,
              mesh=mesh, rules=rules, tx=tx, init_params=init_params, shardings=shardings,
              abstract=state_lib.abstract_state(init_params, _rng(config), tx, ema_decay, shardings))
    # a resume that would change what the checkpoints hold is refused before anything is written
    # every process takes the same branch (Orbax's managers synchronise the processes): process 0's view decides
    resuming = checkpoint_lib.checkpoint_dir(workdir).exists()
    if jax.process_count() > 1:
        resuming = bool(multihost_utils.broadcast_one_to_all(np.int32(resuming)))
    saved = _newest_saved_config(workdir) if resuming else None
    if saved is not None:
        check_resumable(saved[1], config, workdir)
        _check_layout(workdir, saved[0], run.abstract)

    lock = lock_lib.WorkdirLock(workdir) if jax.process_index() == 0 else None
    if lock is not None:
        lock.acquire()
    try:
        return _train(run)
    finally:
        if lock is not None:
            lock.release()


def _newest_saved_config(workdir: str) -> tuple[int, ml_collections.ConfigDict] | None:
    """`(step, config)` of the newest checkpoint whose config reads (None without one); call it only when the
    checkpoint folder exists (nothing is created)."""
    ckpt = checkpoint_lib.Checkpointer(workdir, async_save=False)
    try:
        for step in sorted(ckpt.all_steps(), reverse=True):
            try:
                return step, ckpt.restore_config(step)
            except Exception as e:  # noqa: BLE001 - an unreadable step is reported when the state is restored
                logging.warning("%s: step %d: config unreadable (%s)", workdir, step, e)
        return None
    finally:
        ckpt.close()


def _check_layout(workdir: str, step: int, abstract: state_lib.TrainState) -> None:
    """Refuse (before anything is written) a config whose state does not fit the checkpoint's, field names or not."""
    ckpt = checkpoint_lib.Checkpointer(workdir, async_save=False)
    try:
        diffs = ckpt.layout_mismatch(step, abstract)
    except Exception as e:  # noqa: BLE001 - unreadable metadata: the restore reports the step as unusable
        logging.warning("%s: step %d: state metadata unreadable (%s)", workdir, step, e)
        return
    finally:
        ckpt.close()
    if diffs:
        raise config_lib.ConfigError(
            f"{workdir}: cannot resume, this config builds a train state that does not fit checkpoint step {step}: "
            f"{'; '.join(diffs)}. A changed config field shapes the state (e.g. optim.grad_clip_norm switched on/off, "
            f"optim.ema_decay, the model's shape): resume with the saved config (python -m ttm_jax.main "
            f"--workdir={workdir}, no --config) or start a new workdir")


def _train(run: Run) -> TrainResult:
    config, workdir, modules, mesh, rules = run.config, run.workdir, run.modules, run.mesh, run.rules
    t = config.train
    total_steps = int(t.total_steps)
    if jax.process_index() == 0:
        (epath.Path(workdir) / checkpoint_lib.CONFIG_FILE).write_text(config.to_json(indent=2))
    iterator = run.make_iterator(config, process_index=jax.process_index(), process_count=jax.process_count(),
                             workdir=workdir)

    # --- state -------------------------------------------------------------------------------------------------------
    ckpt = checkpoint_lib.Checkpointer.from_config(workdir, config)
    state, latest, bad = ckpt.restore_newest_usable(run.abstract, iterator)
    for step, reason in bad:
        _say(f"warning: checkpoint step {step} is unusable ({reason}); moved to "
             f"{epath.Path(workdir) / checkpoint_lib.UNUSABLE_DIR}")
    if latest is not None:
        _say(f"resuming from step {latest} ({checkpoint_lib.checkpoint_dir(workdir) / str(latest)})")
    else:
        state, _ = state_lib.init_state(run.init_params, run.rng, run.tx, run.ema_decay, mesh, rules,
                                        run.shard_unannotated,
                                        compile_lib.compiler_options(config),
                                        cache_key=compile_lib.cache_key(config, modules, mesh, "init_state", rules))
        if t.init_from:
            state = state.replace(params=_load_init_from(t.init_from, run.abstract))
            if state.ema_params is not None:
                state = state.replace(ema_params=jax.tree.map(jnp.copy, state.params))
            _say(f"initialised params from {t.init_from}")
        _say(f"starting from step 0: {state_lib.param_count(state.params):,} trainable params, mesh "
             f"{dict(mesh.shape)}, {jax.process_count()} process(es)")
    start = int(jax.device_get(state.step))
    cool = config_lib.cooldown_steps(config.optim, total_steps)
    if latest is not None and cool:
        lr_now = float(state_lib.learning_rate_schedule(config.optim, total_steps)(start))
        fall = total_steps - cool
        _say(f"learning rate at step {start}: {lr_now:.3g} (optim.cooldown_steps={cool}: linear to 0 from step {fall})"
             + (f"; warning: the fall started before this step, so the rate jumps here; for a cooldown of the steps "
                f"added by this run, set optim.cooldown_steps={total_steps - start}" if fall < start else ""))
    # config.data.cached: latents and text embeddings come with the batches; no text encoder is loaded
    frozen, frozen_sh = frozen_lib.init_frozen(config, modules, mesh, rules,
                                               cached=bool(config.data.cached))

    result = TrainResult(start_step=start, final_step=start, preempted=False, history=[], state=state,
                         checkpoint_steps=[])
    if start >= total_steps:
        _say(f"step {start} already reaches train.total_steps={total_steps}; nothing to do (raise total_steps to "
             f"train further)")
        ckpt.close()
        return result

    # --- loop --------------------------------------------------------------------------------------------------------
    writer = metrics_lib.MetricsWriter(workdir, total_steps, start_step=start,
                                       tensorboard=bool(t.tensorboard))
    train_step = None
    bsh = None
    sample_batch = None
    pending: list[tuple[int, dict[str, jax.Array]]] = []
    step = start

    def flush(step: int) -> dict[str, float]:
        """Fetch the pending metrics, stop on a non-finite loss, write the averages."""
        host = jax.device_get(pending)
        pending.clear()
        for s, m in host:
            if not np.isfinite(m["loss"]) or m.get("nonfinite", 0.0) > 0:
                ckpt.wait()
                last = ckpt.latest_step()
                raise FloatingPointError(
                    f"train: step {s} gave a non-finite update (loss {m['loss']}, gradient norm {m['grad_norm']}); it "
                    f"was not applied, and no state with a non-finite update is ever saved. Stopped. The last "
                    f"checkpoint is {'step ' + str(last) if last is not None else 'none'} in "
                    f"{checkpoint_lib.checkpoint_dir(workdir)}. Lower config.optim.learning_rate or raise "
                    f"config.optim.warmup_steps, check the data, then run again (it resumes from that checkpoint)")
            m = {k: v for k, v in m.items() if k != "nonfinite"}
            writer.accumulate(m)
        avg = writer.write(step) if host else {}
        if host:
            result.history.append((step, avg))
        return avg

    def save(step: int) -> None:
        ckpt.save(step, state, iterator, config)
        result.checkpoint_steps.append(step)

    try:
        with preemption.PreemptionGuard() as guard:
            while step < total_steps:
                try:
                    local = next(iterator)
                except StopIteration:
                    _say(f"data exhausted after step {step}; saving and stopping")
                    break
                except records.ShardUnreadable as e:  # stop: skipping would make the resumed run see other data
                    ckpt.wait()
                    last = ckpt.latest_step()
                    resume = (f"run the same command again: it resumes from checkpoint step {last} on the very next "
                              f"example" if last is not None else "run the same command again (no checkpoint yet: "
                              "it starts at step 0)")
                    raise records.ShardUnreadable(f"{e}. Training stopped before step {step + 1}; then {resume}"
                                                  ) from None
                if train_step is None:
                    bsh = step_lib.batch_shardings(local, mesh)
                    train_step = step_lib.make_train_step(config, modules, run.tx, mesh, rules, run.shardings,
                                                          frozen_sh, bsh)
                batch = step_lib.global_batch(local, bsh)
                if sample_batch is None and int(t.sample_every_steps) > 0:
                    sample_batch = jax.tree.map(jnp.copy, batch)
                state, m = train_step(state, frozen, batch)
                step += 1
                pending.append((step, m))
                ckpt_due = step % int(t.checkpoint_every_steps) == 0 or step == total_steps
                sample_due = int(t.sample_every_steps) > 0 and step % int(t.sample_every_steps) == 0
                if step % int(t.log_every_steps) == 0 or ckpt_due or sample_due:
                    flush(step)
                if ckpt_due:
                    save(step)
                if sample_due:
                    params = state.ema_params if state.ema_params is not None else state.params
                    paths = write_samples(config, modules, params, frozen, sample_batch, step, workdir, mesh)
                    if paths:
                        _say(f"step {step}: wrote {', '.join(paths)}")
                if guard.should_stop():
                    flush(step)
                    if not ckpt_due:
                        save(step)
                    _say(f"preempted: saved step {step}; run again with the same workdir to resume")
                    result.preempted = True
                    break
            if pending:
                flush(step)
            if step not in result.checkpoint_steps and step > start:
                save(step)
    finally:
        ckpt.close()
        writer.close()
    result.final_step = step
    result.state = state
    return result
