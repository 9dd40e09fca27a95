"""The reversible rulebook on a toy model with every rule kind: real torch modules vs real Flax modules.

Linear and Conv2d/Conv3d layouts, stack-for-scan (`nn.scan` layers axis), a fused torch qkv split into three Flax
Dense, two torch Linear merged into one Flax Dense, tied weights (aliases), an ignored buffer.
"""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from safetensors.torch import save_file

from ttm_jax.weights import rulebook as rb
from ttm_jax.weights import safetensors_io

D, LAYERS = 6, 3


class TorchBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(D, 3 * D)
        self.to_k2 = torch.nn.Linear(D, D, bias=False)
        self.to_v2 = torch.nn.Linear(D, D, bias=False)
        self.proj = torch.nn.Linear(D, D)
        self.scale = torch.nn.Parameter(torch.randn(D))

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        h = q * torch.sigmoid(k) + v + self.to_k2(x) * self.to_v2(x)
        return x + self.proj(h) * self.scale


class TorchToy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, (3, 2))
        self.conv3 = torch.nn.Conv3d(4, D, (2, 3, 3))
        self.embed = torch.nn.Embedding(10, D)
        self.blocks = torch.nn.ModuleList([TorchBlock() for _ in range(LAYERS)])
        self.out = torch.nn.Linear(D, 10, bias=False)
        self.out.weight = self.embed.weight  # tied: both keys are in the state dict
        self.register_buffer("freqs", torch.arange(4.0))

    def forward(self, img, tokens):  # img [B, 3, H, W]
        y = self.conv(img).unsqueeze(2).repeat(1, 1, 2, 1, 1)  # [B, 4, 2, H', W']
        y = self.conv3(y).mean(dim=(2, 3, 4))  # [B, D]
        x = y + self.embed(tokens)
        for b in self.blocks:
            x = b(x)
        return self.out(x)


class FlaxBlock(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        q, k, v = (nn.Dense(D, name=n)(x) for n in "qkv")
        k2, v2 = jnp.split(nn.Dense(2 * D, use_bias=False, name="kv2")(x), 2, axis=-1)
        h = q * jax.nn.sigmoid(k) + v + k2 * v2
        return x + nn.Dense(D, name="proj")(h) * self.param("scale", nn.initializers.ones, (D,)), None


class FlaxToy(nn.Module):
    @nn.compact
    def __call__(self, img, tokens):  # img [B, H, W, 3]
        y = nn.Conv(4, (3, 2), padding="VALID", name="conv")(img)
        y = nn.Conv(D, (2, 3, 3), padding="VALID", name="conv3")(jnp.repeat(y[:, None], 2, axis=1))
        embed = nn.Embed(10, D, name="embed")
        x = y.mean(axis=(1, 2, 3)) + embed(tokens)
        blocks = nn.scan(FlaxBlock, variable_axes={"params": 0}, split_rngs={"params": True}, length=LAYERS)
        x, _ = blocks(name="blocks")(x, None)
        return embed.attend(x)


BOOK = rb.RuleBook("toy", [
    rb.Rule("conv.weight", "conv/kernel", rb.CONV2D),
    rb.Rule("conv.bias", "conv/bias"),
    rb.Rule("conv3.weight", "conv3/kernel", rb.CONV3D),
    rb.Rule("conv3.bias", "conv3/bias"),
    rb.Rule("embed.weight", "embed/embedding", aliases=("out.weight",)),
    rb.Rule("blocks.{i}.qkv.weight", ("blocks/q/kernel", "blocks/k/kernel", "blocks/v/kernel"), rb.LINEAR,
            stack="i", fuse_axis=0),
    rb.Rule("blocks.{i}.qkv.bias", ("blocks/q/bias", "blocks/k/bias", "blocks/v/bias"), stack="i", fuse_axis=0),
    rb.Rule(("blocks.{i}.to_k2.weight", "blocks.{i}.to_v2.weight"), "blocks/kv2/kernel", rb.LINEAR, stack="i",
            fuse_axis=1),
    rb.Rule("blocks.{i}.proj.weight", "blocks/proj/kernel", rb.LINEAR, stack="i"),
    rb.Rule("blocks.{i}.proj.bias", "blocks/proj/bias", stack="i"),
    rb.Rule("blocks.{i}.scale", "blocks/scale", stack="i"),
    rb.Ignore("freqs", "recomputed buffer"),
])


@pytest.fixture(scope="module")
def toy():
    torch.manual_seed(0)
    model = TorchToy().eval()
    sd = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    img = np.random.default_rng(0).normal(size=(2, 3, 7, 6)).astype(np.float32)
    tokens = np.array([3, 7])
    template = jax.eval_shape(FlaxToy().init, jax.random.key(0), img.transpose(0, 2, 3, 1), tokens)["params"]
    return model, sd, img, tokens, template


def test_converted_flax_toy_matches_torch(toy):
    model, sd, img, tokens, template = toy
    params = BOOK.to_flax(sd, template)
    assert params["blocks"]["q"]["kernel"].shape == (LAYERS, D, D)  # stacked for scan
    got = FlaxToy().apply({"params": params}, img.transpose(0, 2, 3, 1), tokens)
    with torch.no_grad():
        want = model(torch.from_numpy(img), torch.from_numpy(tokens)).numpy()
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=1e-5)


def test_stack_for_scan_slices_are_the_torch_layers(toy):
    _, sd, _, _, template = toy
    params = BOOK.to_flax(sd, template)
    for i in range(LAYERS):
        np.testing.assert_array_equal(params["blocks"]["proj"]["kernel"][i], sd[f"blocks.{i}.proj.weight"].T)
        np.testing.assert_array_equal(params["blocks"]["v"]["kernel"][i], sd[f"blocks.{i}.qkv.weight"][2 * D:].T)
        np.testing.assert_array_equal(params["blocks"]["kv2"]["kernel"][i, :, D:], sd[f"blocks.{i}.to_v2.weight"].T)


def test_round_trip_is_bit_identical_both_ways(toy):
    _, sd, _, _, template = toy
    torch_specs = {k: v for k, v in sd.items()}
    back = BOOK.to_torch(BOOK.to_flax(sd, template), torch_specs)
    assert set(back) == set(sd) - {"freqs"}
    for k, v in back.items():
        assert v.dtype == sd[k].dtype and v.tobytes() == sd[k].tobytes(), k
    # without a torch template, the rules alone name the keys (aliases included)
    assert set(BOOK.to_torch(BOOK.to_flax(sd, template))) == set(back)
    rng = np.random.default_rng(1)
    params = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(s.dtype), template)
    again = BOOK.to_flax(BOOK.to_torch(params), template)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), again, params)


def test_unmapped_and_missing_keys_are_named(toy):
    _, sd, _, _, template = toy
    extra = dict(sd, **{"head.extra.weight": np.zeros((2, 2), np.float32)})
    with pytest.raises(rb.ConversionError, match=r"unmapped torch key 'head\.extra\.weight'.*no rule matches"):
        BOOK.to_flax(extra, template)
    missing = {k: v for k, v in sd.items() if k != "blocks.1.to_v2.weight"}
    with pytest.raises(rb.ConversionError, match=r"missing torch key 'blocks\.1\.to_v2\.weight'.*blocks/kv2/kernel"):
        BOOK.to_flax(missing, template)
    beyond = dict(sd, **{"blocks.3.proj.bias": sd["blocks.0.proj.bias"]})  # a 4th layer the Flax model lacks
    with pytest.raises(rb.ConversionError, match=r"unused torch key 'blocks\.3\.proj\.bias'.*blocks/proj/bias"):
        BOOK.to_flax(beyond, template)
    short = rb.RuleBook("toy", [r for r in BOOK.rules + BOOK.ignores if getattr(r, "flax", "") != "blocks/scale"])
    with pytest.raises(rb.ConversionError, match=r"unmapped flax param 'blocks/scale'") as e:
        short.to_flax(sd, template)
    assert "blocks.0.scale" in str(e.value)  # and the torch keys left over are named too
    with pytest.raises(rb.ConversionError, match=r"unmapped flax param 'blocks/scale'"):
        short.to_torch(BOOK.to_flax(sd, template))


def test_shape_mismatch_is_named(toy):
    _, sd, _, _, template = toy
    bad = dict(sd, **{"blocks.2.proj.weight": np.zeros((D, D + 1), np.float32)})
    msg = rf"shape mismatch: torch 'blocks\.2\.proj\.weight' is \({D}, {D + 1}\).*blocks/proj/kernel"
    with pytest.raises(rb.ConversionError, match=msg):
        BOOK.to_flax(bad, template)
    wrong_torch = {k: (v.shape if k != "conv.weight" else (4, 3, 2, 3)) for k, v in sd.items()}
    with pytest.raises(rb.ConversionError, match=r"shape mismatch: torch 'conv\.weight'"):
        BOOK.to_torch(BOOK.to_flax(sd, template), wrong_torch)


def test_tied_copies_must_agree(toy):
    _, sd, _, _, template = toy
    untied = dict(sd, **{"out.weight": sd["embed.weight"] + 1})
    with pytest.raises(rb.ConversionError, match=r"'out\.weight' should be a tied copy.*embed/embedding"):
        BOOK.to_flax(untied, template)
    only_primary = {k: v for k, v in sd.items() if k != "out.weight"}  # aliases are optional
    np.testing.assert_array_equal(BOOK.to_flax(only_primary, template)["embed"]["embedding"], sd["embed.weight"])


def test_streams_sharded_bfloat16_safetensors(toy, tmp_path):
    _, sd, _, _, template = toy
    tensors = {k: torch.from_numpy(v).to(torch.bfloat16) for k, v in sd.items()}
    keys = sorted(tensors)
    shards = {"a.safetensors": keys[::2], "b.safetensors": keys[1::2]}
    for name, ks in shards.items():
        save_file({k: tensors[k].contiguous() for k in ks}, str(tmp_path / name))
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {k: n for n, ks in shards.items() for k in ks}}))
    reader = safetensors_io.SafetensorsReader(tmp_path)
    assert reader.specs["conv.weight"] == ((4, 3, 3, 2), np.dtype(rb.as_dtype("bfloat16")))
    seen = []
    params = rb.stream_to_flax(BOOK, reader, template, on_tensor=seen.append)
    assert sorted(seen) == keys and params["conv"]["kernel"].dtype == np.float32  # the template's dtype
    want = BOOK.to_flax({k: v.float().numpy() for k, v in tensors.items()}, template)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), params, want)
    back = BOOK.to_torch(params, reader.specs)  # bf16 -> fp32 -> bf16 is exact
    for k, v in back.items():
        assert v.dtype == reader[k].dtype and v.tobytes() == np.asarray(reader[k]).tobytes(), k


def test_transforms_index_as_documented():
    t = rb.Chain((rb.LINEAR, rb.SplitAxis(1, 3)))  # torch [H*Dh, in] -> flax [in, H, Dh]
    x = np.arange(6 * 4, dtype=np.float32).reshape(6, 4)
    y = t.to_flax(x)
    assert y.shape == t.flax_shape(x.shape) == (4, 3, 2) and t.torch_shape(y.shape) == x.shape
    for i, h, d in np.ndindex(*y.shape):
        assert y[i, h, d] == x[h * 2 + d, i]
    np.testing.assert_array_equal(t.to_torch(y), x)
    w = np.random.default_rng(0).normal(size=(5, 4, 2, 3, 3))  # torch Conv3d [O, I, kt, kh, kw]
    k = rb.CONV3D.to_flax(w)
    assert k[1, 2, 0, 3, 4] == w[4, 3, 1, 2, 0]  # flax [kt, kh, kw, I, O]


def test_rules_that_cannot_invert_are_refused():
    with pytest.raises(ValueError, match="not invertible"):
        rb.Rule("blocks.{i}.w", "w")  # i would be lost
    with pytest.raises(ValueError, match="must not appear in the Flax path"):
        rb.Rule("blocks.{i}.w", "blocks_{i}/w", stack="i")
    with pytest.raises(ValueError, match="only one side"):
        rb.Rule(("a", "b"), ("c", "d"))


def test_stack_offset_splits_one_torch_stack_over_two_scans():
    book = rb.RuleBook("split", [
        rb.Rule("b.{i}.w", "first/w", rb.LINEAR, stack="i"),  # torch layers 0..1
        rb.Rule("b.{i}.w", "rest/w", rb.LINEAR, stack="i", stack_offset=2),  # torch layers 2..4
    ])
    rng = np.random.default_rng(0)
    sd = {f"b.{i}.w": rng.normal(size=(3, 2)).astype(np.float32) for i in range(5)}
    template = {"first": {"w": ((2, 2, 3), np.float32)}, "rest": {"w": ((3, 2, 3), np.float32)}}
    params = book.to_flax(sd, template)
    np.testing.assert_array_equal(params["first"]["w"][1], sd["b.1.w"].T)
    np.testing.assert_array_equal(params["rest"]["w"][0], sd["b.2.w"].T)
    back = book.to_torch(params, sd)
    assert all(back[k].tobytes() == v.tobytes() for k, v in sd.items()) and set(back) == set(sd)


def test_flax_only_params_keep_their_initial_values(toy):
    _, sd, _, _, template = toy
    book = rb.RuleBook("toy+", BOOK.rules + BOOK.ignores + [rb.FlaxOnly("blocks/scale", "new, zero-init")])
    no_scale = {k: v for k, v in sd.items() if not k.endswith(".scale")}
    with pytest.raises(rb.ConversionError, match=r"'blocks/scale' has no torch source"):
        book.to_flax(no_scale, template)  # shapes only: nothing to keep
    init = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), template)
    init["blocks"]["scale"] = np.full((LAYERS, D), 0.5, np.float32)
    params = book.to_flax(no_scale, init)
    np.testing.assert_array_equal(params["blocks"]["scale"], init["blocks"]["scale"])
    np.testing.assert_array_equal(params["conv"]["bias"], sd["conv.bias"])
    assert set(book.to_torch(params, no_scale)) == set(no_scale) - {"freqs"}


def test_write_safetensors_keeps_0d_tensors(tmp_path):
    """A 0-d tensor (CLIPModel's logit_scale) is written 0-d and reads back equal, also in safetensors' own reader."""
    path = str(tmp_path / "t.safetensors")
    tensors = {"logit_scale": np.float32(2.6592), "w": np.arange(6, dtype=np.float32).reshape(2, 3)}
    safetensors_io.write_safetensors(path, {k: rb.spec_of(np.asarray(v)) for k, v in tensors.items()},
                                     [(k, np.asarray(v)) for k, v in tensors.items()])
    ours, theirs = safetensors_io.SafetensorsReader(path), load_file(path)
    for k, v in tensors.items():
        assert np.asarray(ours[k]).shape == np.shape(v) == theirs[k].shape
        np.testing.assert_array_equal(theirs[k], v)
