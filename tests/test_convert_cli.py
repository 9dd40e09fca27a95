"""`python -m ttm_jax.convert --from=... --to=...`: diffusers -> orbax -> torch gives back what diffusers loads,
every tensor bit-identical; `--stage` grafts into a stage model; `--dtype` casts."""

from __future__ import annotations

import json
import os

import numpy as np
import orbax.checkpoint as ocp
import pytest
import torch
from diffusers import WanTransformer3DModel

from ttm_jax import cli
from ttm_jax.convert import __main__ as convert_cli

TORCH_CONFIG = dict(patch_size=(1, 2, 2), num_attention_heads=3, attention_head_dim=12, in_channels=4,
                    out_channels=4, text_dim=20, freq_dim=16, ffn_dim=40, num_layers=3, cross_attn_norm=True,
                    qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=32)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    torch.manual_seed(1)
    model = WanTransformer3DModel(**TORCH_CONFIG).eval()
    with torch.no_grad():  # move zero/one-initialised params off their init so misplaced tensors show
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "scale_shift_table" in name:
                p.copy_(p + 0.1 * torch.randn_like(p))
    path = str(tmp_path_factory.mktemp("src") / "transformer")
    model.save_pretrained(path, safe_serialization=True)
    return path, {k: v.detach().clone() for k, v in model.state_dict().items()}


def _restore(params_dir):
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(params_dir)


def test_diffusers_orbax_torch_round_trip_is_bit_identical(source, tmp_path):
    src, state = source
    convert_cli.convert([f"--from=diffusers:{src}", f"--to=orbax:{tmp_path / 'orbax'}"])
    meta = json.loads((tmp_path / "orbax" / "ttm_convert.json").read_text())
    assert meta["in_channels"] == 4 and meta["model"]["ttm_layers"] == 0  # the backbone as it is
    convert_cli.convert([f"--from=orbax:{tmp_path / 'orbax'}", f"--to=torch:{tmp_path / 'back'}"])
    back = WanTransformer3DModel.from_pretrained(str(tmp_path / "back")).state_dict()
    assert set(back) == set(state)
    for k, v in state.items():
        assert back[k].dtype == v.dtype, k
        assert torch.equal(back[k], v), k


def test_stage2_graft_and_bf16(source, tmp_path):
    src, state = source
    convert_cli.convert([f"--from=diffusers:{src}", f"--to=orbax:{tmp_path / 's2'}", "--stage=2", "--dtype=bf16"])
    meta = json.loads((tmp_path / "s2" / "ttm_convert.json").read_text())
    assert meta["in_channels"] == 12  # noisy latent + two conditions
    assert meta["model"]["ttm_layers"] == 1  # ceil(3 / 4)
    params = _restore(str(tmp_path / "s2" / "params"))
    leaves = []

    def walk(t, path=()):
        if isinstance(t, dict):
            for k, v in t.items():
                walk(v, path + (k,))
        else:
            leaves.append(("/".join(path), np.asarray(t)))

    walk(params)
    assert leaves and all(a.dtype == np.dtype("bfloat16") for _, a in leaves)
    kernel = dict(leaves)["patch_embedding/kernel"]  # [pt, ph, pw, in, dim]
    assert kernel.shape[3] == 12
    assert not np.any(kernel[..., 4:, :].astype(np.float32))  # the new condition channels start at zero
    w = state["patch_embedding.weight"].numpy()  # [dim, in, pt, ph, pw]
    np.testing.assert_array_equal(kernel[..., :4, :].astype(np.float32),
                                  w.transpose(2, 3, 4, 1, 0).astype("bfloat16").astype(np.float32))
    assert any(p.startswith("ttm_blocks/masked_cross_attn") for p, _ in leaves)


def test_bad_specs_name_the_fix(source, tmp_path):
    src, _ = source
    with pytest.raises(cli.BadInput, match="supported"):
        convert_cli.convert([f"--from=orbax:{src}", f"--to=orbax:{tmp_path}"])
    with pytest.raises(cli.BadInput, match="bf16 or fp32"):
        convert_cli.convert([f"--from=diffusers:{src}", f"--to=orbax:{tmp_path}", "--dtype=int8"])
    with pytest.raises(cli.BadInput, match="--config needs --stage"):
        convert_cli.convert([f"--from=diffusers:{src}", f"--to=orbax:{tmp_path}", "--config=configs/stage2.py"])
    assert not os.path.exists(tmp_path / "params")


def test_existing_destinations_need_overwrite(source, tmp_path):
    """A non-empty `--to=torch:` folder and an existing Orbax params checkpoint are refused (before any source is read)
    and left as they were; `--overwrite` replaces the export, which loads bit-identically."""
    src, state = source
    orbax = tmp_path / "orbax"
    convert_cli.convert([f"--from=diffusers:{src}", f"--to=orbax:{orbax}"])
    stamp = (orbax / "ttm_convert.json").read_text()
    with pytest.raises(cli.BadInput, match=r"--to=orbax:.*/params: an Orbax checkpoint is already there; pass "
                                         r"--overwrite"):
        convert_cli.convert([f"--from=diffusers:{src}", f"--to=orbax:{orbax}"])
    assert (orbax / "ttm_convert.json").read_text() == stamp

    dst = tmp_path / "export"
    dst.mkdir()
    (dst / "config.json").write_text('{"mine": true}')
    with pytest.raises(cli.BadInput, match=r"--to=torch:.*export: the folder is not empty \(config.json\); pass "
                                         r"--overwrite"):
        convert_cli.convert([f"--from=orbax:{orbax}", f"--to=torch:{dst}"])
    with pytest.raises(cli.BadInput, match="not empty"):  # the params folder itself as the source too
        convert_cli.convert([f"--from=orbax:{orbax}/params", f"--to=torch:{dst}"])
    assert os.listdir(dst) == ["config.json"] and (dst / "config.json").read_text() == '{"mine": true}'

    convert_cli.convert([f"--from=orbax:{orbax}", f"--to=torch:{dst}", "--overwrite"])
    back = WanTransformer3DModel.from_pretrained(str(dst)).state_dict()
    assert set(back) == set(state) and all(torch.equal(back[k], v) for k, v in state.items())
    convert_cli.convert([f"--from=diffusers:{src}", f"--to=orbax:{orbax}", "--overwrite", "--stage=1"])
    assert json.loads((orbax / "ttm_convert.json").read_text())["in_channels"] == 12  # replaced
