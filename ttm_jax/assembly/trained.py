"""A trained stage loaded from its workdir: the config saved with the latest checkpoint, the modules it names, the
(EMA) params placed as training placed them, the frozen parts, the mesh. Used by sampling, export and evaluation."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections

from ttm_jax.assembly import frozen as frozen_lib
from ttm_jax.assembly import params as params_lib
from ttm_jax.assembly.modules import Modules, build_modules
from ttm_jax.runtime import checkpoint as checkpoint_lib
from ttm_jax.runtime import mesh as mesh_lib
from ttm_jax.runtime import sharding as sharding_lib


@dataclasses.dataclass
class Stage:
    """A trained stage rebuilt from its workdir: config, modules, (EMA) params, frozen text encoder, mesh."""

    config: ml_collections.ConfigDict
    modules: Modules
    params: Any
    frozen: dict[str, Any]
    mesh: jax.sharding.Mesh
    rules: Any
    step: int
    workdir: str

    @property
    def stage(self) -> int:
        return int(self.config.stage)


def load_stage(workdir: str, stage: int, *, field: str = "", ema: bool = True,
               devices: Sequence[jax.Device] | None = None) -> Stage:
    """The latest checkpoint of `workdir` with the config saved beside it; `stage` is checked. Only the parameters are
    read (`checkpoint.restore_params`): the EMA ones when `ema` and the run kept an EMA, else the raw ones. `field`
    names the config field that gave `workdir` in errors (default `config.sample.stage<N>_workdir`). `devices`: the
    devices of the stage's mesh (default all of every process; `jax.local_devices()` lets each process of a
    multi-host job run its own requests, as the evaluation run does)."""
    field = field or f"config.sample.stage{stage}_workdir"
    if not workdir:
        raise ValueError(f"{field} is empty; set it to a stage-{stage} training workdir (python -m ttm_jax.main "
                         f"--config=configs/stage{stage}.py --workdir=DIR)")
    ckpt = checkpoint_lib.Checkpointer(workdir, async_save=False)
    try:
        step = ckpt.latest_step()
        if step is None:
            raise FileNotFoundError(f"{field}: {checkpoint_lib.checkpoint_dir(workdir)} holds no checkpoint; train "
                                    f"stage {stage} there first (python -m ttm_jax.main "
                                    f"--config=configs/stage{stage}.py --workdir={workdir})")
        config = ckpt.restore_config(step)
    finally:
        ckpt.close()
    if int(config.stage) != stage:
        raise ValueError(f"{field}: {workdir} holds a stage-{config.stage} model; point it to a stage-{stage} "
                         f"workdir")
    try:
        mesh = mesh_lib.make_mesh(config.mesh, devices)
    except mesh_lib.MeshError:
        # trained on another device count: sampling only needs the parameters, so shard them over all devices here
        fallback = ml_collections.ConfigDict({"shape": {"data": 1, "fsdp": -1, "tensor": 1}})
        mesh = mesh_lib.make_mesh(fallback, devices)
    rules = sharding_lib.rules_from_config(config.mesh)
    modules = build_modules(config)
    shardings = params_lib.param_shardings(config, modules, mesh, rules)
    # params only: the AdamW moments are never read
    params = checkpoint_lib.restore_params(workdir, step, ema=ema, shardings=shardings).params
    frozen, _ = frozen_lib.init_frozen(config, modules, mesh, rules)
    return Stage(config, modules, params, frozen, mesh, rules, int(step), str(workdir))
