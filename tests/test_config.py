"""Configs: every variant validates; bad values fail at start-up naming the field and the fix."""

import json
import os
import subprocess
import sys

import ml_collections
import pytest

from ttm_jax import config as config_lib
from ttm_jax import main as main_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.parametrize("variant", config_lib.VARIANTS)
def test_variants_validate(stage, variant):
    c = config_lib.validate(config_lib.build(stage, variant))
    assert c.stage == stage and c.variant == variant
    # stage 1 has no local prompts, so no added masked layers
    assert (c.model.ttm_layers == 0) == (stage == 1)


def test_wan13b_shapes():
    m = config_lib.build(2, "wan1.3b").model
    assert (m.dim, m.num_layers, m.num_heads, m.ffn_dim, m.text_dim, m.freq_dim) == (1536, 30, 12, 8960, 4096, 256)
    assert tuple(m.patch_size) == (1, 2, 2)
    assert config_lib.build(2, "wan1.3b").autoencoder.latent_channels == 16


def test_arg_forms_agree():
    assert config_lib.build(2, "mid").to_dict() == config_lib.build(2, "variant=mid").to_dict()
    assert config_lib.build(2, None).variant == "tiny"


@pytest.mark.parametrize(
    "field,value,needle",
    [
        ("model.num_heads", 3, "config.model.dim"),
        ("model.attention", "flash", "config.model.attention"),
        ("model.ttm_layers", 9, "config.model.ttm_layers"),
        ("data.num_frames", 10, "config.data.num_frames"),
        ("data.height", 61, "config.data.height"),
        ("model.remat_policy", "some", "config.model.remat_policy"),
        ("autoencoder.latent_channels", 7, "config.autoencoder.latent_channels"),
        ("data.annotation", "both_", "config.data.annotation"),
    ],
)
def test_bad_values_name_the_field(field, value, needle):
    c = config_lib.build(2, "tiny")
    section, key = field.split(".")
    c[section][key] = value
    with pytest.raises(config_lib.ConfigError, match=needle.replace(".", r"\.")):
        config_lib.validate(c)


def test_unknown_variant_and_arg_key():
    with pytest.raises(config_lib.ConfigError, match="unknown variant 'huge'"):
        config_lib.build(2, "huge")
    with pytest.raises(config_lib.ConfigError, match="unknown key"):
        config_lib.build(2, "variant=tiny,size=3")


def _main(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "ttm_jax.main", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_main_rejects_bad_value_before_compute(tmp_path):
    r = _main("--config=configs/stage2.py", f"--workdir={tmp_path}", "--config.model.attention=flash")
    assert r.returncode != 0
    assert "config.model.attention" in r.stderr and "choose one of" in r.stderr
    assert not os.listdir(tmp_path)  # nothing was written: no compute spent


def test_main_rejects_unknown_key(tmp_path):
    r = _main("--config=configs/stage2.py", f"--workdir={tmp_path}", "--config.model.nope=1")
    assert r.returncode != 0
    assert "nope" in r.stderr


def test_config_restored_from_workdir(tmp_path):
    c = config_lib.build(1, "tiny")
    c.train.total_steps = 7
    (tmp_path / "config.json").write_text(json.dumps(c.to_dict()))
    got = main_lib.resolve_config(False, config_lib.build(2, "tiny"), str(tmp_path))
    assert got.stage == 1 and got.train.total_steps == 7
    # an explicit --config wins over the saved one
    explicit = config_lib.build(2, "tiny")
    assert main_lib.resolve_config(True, explicit, str(tmp_path)) is explicit
    assert isinstance(got, ml_collections.ConfigDict)
