"""`config.upgrade`: a config saved before a field existed is completed with the value its run had, where a saved
config is read (`checkpoint.load_config`), so the code reads every field as an attribute."""

from __future__ import annotations

import json
import os

import pytest

from ttm_jax import config as config_lib
from ttm_jax.inference import pipeline
from ttm_jax.runtime import checkpoint as checkpoint_lib


def _old(config):
    """`config` as a run saved before every `UPGRADES` field existed: those fields deleted from its dict."""
    d = config.to_dict()
    for section, fields in config_lib.UPGRADES.items():
        for field in fields:
            d[section].pop(field, None)
    return d


@pytest.mark.parametrize("stage", sorted(config_lib.STAGES))
@pytest.mark.parametrize("variant", config_lib.VARIANTS)
def test_every_upgraded_field_is_a_current_field_and_comes_back(stage, variant):
    c = config_lib.build(stage, variant)
    for section, fields in config_lib.UPGRADES.items():
        missing = sorted(set(fields) - set(c[section]))
        assert not missing, f"{section}.{missing}: in UPGRADES but not in a current {variant} stage-{stage} config"
    got = config_lib.upgrade(config_lib.ml_collections.ConfigDict(_old(c)))
    for section, fields in config_lib.UPGRADES.items():
        for field, value in fields.items():
            have = got[section][field]
            have = have.to_dict() if isinstance(have, config_lib.ml_collections.ConfigDict) else have
            assert have == value, (section, field)
    # a current config is left as it is
    assert config_lib.upgrade(config_lib.build(stage, variant)).to_dict() == c.to_dict()


def test_backward_values_are_the_old_behaviour_not_todays_defaults():
    got = config_lib.upgrade(config_lib.ml_collections.ConfigDict(_old(config_lib.build(2, "tiny"))))
    assert got.data.min_object_area == 0.0  # today 0.002
    assert got.data.synthetic_rung == config_lib.SYNTHETIC_FULL_RUNG  # tiny today: rung 3
    assert got.model.backbone == "dit" and got.objective.name == "rectified_flow" and got.text_encoder.name == "t5"
    assert got.optim.cooldown_steps == 0 and got.optim.cooldown_fraction == 0.0 and got.mesh.context == 1
    assert config_lib.cooldown_steps(got.optim, 100) == 0


def test_an_old_style_workdir_reads_validates_and_feeds_generation(tmp_path):
    """Two workdirs holding only the `config.json` of runs saved without the newer fields: `load_config` upgrades
    them, they validate, keep their model's input channels, and give the pipeline its geometry."""
    wds = {}
    for stage in (1, 2):
        c = config_lib.build(stage, "mid")  # a DiT variant whose stage configs are the table's (no stage row)
        wd = tmp_path / f"stage{stage}"
        os.makedirs(wd)
        (wd / checkpoint_lib.CONFIG_FILE).write_text(json.dumps(_old(c)))
        loaded = config_lib.validate(checkpoint_lib.load_config(str(wd)))
        assert loaded.model.backbone == "dit" and loaded.model.self_condition is False
        assert config_lib.in_channels(loaded) == config_lib.in_channels(c)
        wds[stage] = str(wd)
    geometry = pipeline.Geometry.from_workdirs(wds[1], wds[2])
    c = config_lib.build(2, "mid")
    assert (geometry.num_frames, geometry.height, geometry.width) == (c.data.num_frames, c.data.height, c.data.width)
