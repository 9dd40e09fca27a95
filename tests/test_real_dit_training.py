"""Training with the REAL DiT (masked TTM layers, scanned blocks, stage 2) in the default suite.

Every other default-suite training, checkpoint and sharding test runs `train_fixtures.StandInDiT`; these pin two
properties on the real model at the tiny size (8 video tokens, width 32, one scanned TTM block with both masked
layers; one block keeps the compiles within the suite's budget, `test_train_sharding.py`'s `slow` test has two):

- resume: 2 steps, then a resume to 4 steps in the same workdir, equal 4 uninterrupted steps bit for bit (params,
  optimizer state, EMA, losses);
- 8 simulated devices with an FSDP mesh (data=1, fsdp=8) train 2 steps from scratch to the losses and params of one
  device, within fp32 tolerance (params born sharded, the real model's logical constraints, the scanned `layers`
  axis and masked attention under sharding).
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
import train_fixtures as fx

from ttm_jax.assembly import params as params_lib
from ttm_jax.runtime import sharding as sharding_lib
from ttm_jax.train import loop


def _cfg(total_steps: int, **shape: int):
    c = fx.tiny_config(2, **{"train.total_steps": total_steps, "model.num_layers": 1})
    c.mesh.shape.update(**{"data": 1, "fsdp": -1, "tensor": 1, **shape})
    assert c.model.scan_layers and c.model.ttm_layers == c.model.num_layers == 1 and c.model.ttm_masked
    return c


def _host(tree):
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


def _losses(result) -> list[float]:
    return [h[1]["loss"] for h in result.history]


def _one_device():
    return jax.devices()[:1]


@pytest.fixture(scope="module")
def modules():
    return fx.make_modules(_cfg(4), real_model=True)


@pytest.fixture(scope="module")
def uninterrupted(modules, tmp_path_factory):
    """4 steps on one device."""
    wd = str(tmp_path_factory.mktemp("uninterrupted"))
    res = loop.train(_cfg(4), wd, modules=modules, make_iterator=fx.iterator_factory(), devices=_one_device())
    assert res.start_step == 0 and res.final_step == 4 and not res.preempted
    return res


@pytest.fixture(scope="module")
def step_two(modules, tmp_path_factory):
    """(2-step run, its workdir holding the step-2 checkpoint, its params) on one device."""
    wd = str(tmp_path_factory.mktemp("step_two"))
    res = loop.train(_cfg(2), wd, modules=modules, make_iterator=fx.iterator_factory(), devices=_one_device())
    assert res.final_step == 2 and res.checkpoint_steps == [2]
    return res, wd, _host(res.state.params)


def test_the_model_is_the_real_dit_with_scanned_masked_layers(modules):
    """Not vacuous: the runs below train the real DiT, its TTM block stacked on the scan axis."""
    c = _cfg(4)
    abstract = sharding_lib.unbox(jax.eval_shape(params_lib.make_init_params(c, modules), jax.random.PRNGKey(0)))
    assert {"masked_self_attn", "masked_cross_attn"} <= set(abstract["ttm_blocks"])
    assert abstract["ttm_blocks"]["masked_self_attn"]["attn"]["to_q"]["kernel"].shape == (1, 32, 32)  # [layers, ...]
    assert set(abstract["ttm_blocks"]) >= {"attn1", "attn2", "ffn"}


def test_resume_equals_uninterrupted(modules, uninterrupted, step_two):
    first, wd, _ = step_two
    second = loop.train(_cfg(4), wd, modules=modules, make_iterator=fx.iterator_factory(), devices=_one_device())
    assert second.start_step == 2 and second.final_step == 4
    jax.tree.map(np.testing.assert_array_equal, _host(second.state), _host(uninterrupted.state))
    assert _losses(first) + _losses(second) == _losses(uninterrupted)
    # the masked layers trained: their zero-initialised output projections moved
    ttm = _host(uninterrupted.state.params)["ttm_blocks"]
    for layer in ("masked_self_attn", "masked_cross_attn"):
        assert np.abs(ttm[layer]["attn"]["to_out"]["kernel"]).max() > 1e-4, layer


@pytest.mark.slow  # ~26 s; in the suite: test_train_sharding's 8-device (data 2 x fsdp 4) run equals 1 device
def test_eight_devices_fsdp_equal_one_device(modules, step_two, tmp_path):
    one, _, one_params = step_two
    eight = loop.train(_cfg(2, fsdp=8), str(tmp_path), modules=modules, make_iterator=fx.iterator_factory())
    assert eight.start_step == 0 and eight.final_step == 2
    # the params really were sharded over the 8 devices (the q kernel's embed axis on fsdp)
    q = eight.state.params["ttm_blocks"]["masked_self_attn"]["attn"]["to_q"]["kernel"]
    assert len(q.sharding.device_set) == 8 and "fsdp" in jax.tree.leaves(tuple(q.sharding.spec))
    np.testing.assert_allclose(_losses(eight), _losses(one), rtol=1e-4)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=2e-4, atol=2e-6), _host(eight.state.params),
                 one_params)
    # not vacuous: the 2 steps moved the params far beyond the tolerance: the masked layers' zero-initialised outputs
    to_out = one_params["ttm_blocks"]["masked_self_attn"]["attn"]["to_out"]["kernel"]
    assert np.abs(to_out).max() > 1e-4
