"""The encoding program (`ttm_jax.data.encode`): cached latents and text embeddings keep the prepared records' ids
and equal the frozen encoders applied directly; processes' shares make the same folder; an interrupted run resumes
to the same output; training from the cache gives the loss of training from pixels, with no encoder in the step."""

import os
import shutil
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
import train_fixtures as fx

from ttm_jax import config as config_lib
from ttm_jax import describe, storage
from ttm_jax.assembly import frozen as frozen_lib
from ttm_jax.assembly import inputs as inputs_lib
from ttm_jax.assembly import modules as modules_lib
from ttm_jax.assembly import params as params_lib
from ttm_jax.assembly.registry import make_autoencoder
from ttm_jax.data import encode, loader, prepare, records, synthetic
from ttm_jax.runtime import mesh as mesh_lib
from ttm_jax.runtime import sharding as sharding_lib
from ttm_jax.train import loop, preflight
from ttm_jax.train import step as step_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N = 6  # records; 4 per output shard -> shards of 4 and 2
PER_SHARD = 4
TEXT_FIELDS = ("caption_embedding", "motion_embedding", "local_embedding")


@pytest.fixture(scope="module")
def config():
    return fx.tiny_config(2)


@pytest.fixture(scope="module")
def prepared(config, tmp_path_factory):
    root = tmp_path_factory.mktemp("enc")
    sav_dir = str(root / "sav")
    synthetic.generate(sav_dir, N, seed=2, height=64, width=64, frames=24, videos_per_shard=N)
    out = str(root / "prepared")
    prepare.prepare(sav_dir, os.path.join(sav_dir, synthetic.CAPTIONS_FILE), out, config, chunk_size=4)
    return out


@pytest.fixture(scope="module")
def encoders(config):
    """The frozen encoders on this process' 8 devices."""
    return frozen_lib.make_encoders(config, frozen_lib.encoding_mesh(config))


@pytest.fixture(scope="module")
def stage(config):
    """The training run's modules (`StandInDiT`, the real autoencoder and text encoder) and frozen inputs, one
    device."""
    mods = fx.make_modules(config)
    mesh = mesh_lib.make_mesh(config.mesh, jax.devices()[:1])
    rules = sharding_lib.rules_from_config(config.mesh)
    return mods, frozen_lib.init_frozen(config, mods, mesh, rules)[0], mesh, rules


@pytest.fixture(scope="module")
def encoded(config, prepared, encoders, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("encoded") / "out")
    summary = encode.encode(prepared, out, config, encoders, records_per_shard=PER_SHARD)
    assert summary.complete and summary.records == N and summary.shards_done == 2
    return out


def _records(folder):
    return [records.decode(r) for p in records.shard_paths(folder) for r in records.read_shard(p)]


def _assert_same_records(got_folder, want_folder, *, exact=True):
    got, want = _records(got_folder), _records(want_folder)
    assert [(r["video_id"], r["clip"]) for r in got] == [(r["video_id"], r["clip"]) for r in want]
    for g, w in zip(got, want, strict=True):
        assert set(g) == set(w)
        for k, v in w.items():
            if isinstance(v, np.ndarray) and v.dtype == np.float32 and not exact:
                np.testing.assert_allclose(g[k], v, rtol=1e-5, atol=1e-5, err_msg=k)
            elif isinstance(v, np.ndarray):
                np.testing.assert_array_equal(g[k], v, err_msg=k)
            else:
                assert g[k] == v, k


def test_same_record_ids_latents_and_embeddings_as_the_encoders_applied_directly(config, prepared, encoded, stage):
    src, out = _records(prepared), _records(encoded)
    assert [(r["video_id"], r["clip"]) for r in out] == [(r["video_id"], r["clip"]) for r in src]
    for s, o in zip(src, out, strict=True):  # everything of the prepared record is kept as it was
        for k, v in s.items():
            np.testing.assert_array_equal(o[k], v, err_msg=k)
    # the latents: the configured autoencoder on the pixels, applied here on its own
    ae = make_autoencoder(config.autoencoder)
    for key in ("video", "trajectory"):
        want = ae.encode(jnp.asarray(np.stack([r[key] for r in src]), jnp.float32) / 127.5 - 1.0)
        got = np.stack([r[f"{key}_latent"] for r in out])
        assert got.dtype == np.float32 and got.shape == (N, *config_lib.latent_shape(config))
        np.testing.assert_allclose(got, want, atol=1e-6)
    # the text: the loader's tokens, the stage's encode_text with the training run's frozen text encoder (one device)
    mods, frozen, _, _ = stage
    t = config.text_encoder
    toks = [loader.tokenize_prompts(mods.tokenizer, s["caption"], s["motion_prompt"], s["local_prompts"],
                                    max_length=t.max_length, local_max_length=t.local_max_length) for s in src]
    for o, tk in zip(out, toks, strict=True):
        for k, v in tk.items():
            np.testing.assert_array_equal(o[k], v, err_msg=k)
    text = jax.jit(lambda te, i, m: inputs_lib.encode_text(mods, te, i, m))
    for name, length in (("caption", t.max_length), ("motion", t.max_length), ("local", t.local_max_length)):
        ids = np.stack([tk[f"{name}_tokens"] for tk in toks]).reshape(-1, length)  # all records in one call
        mask = np.stack([tk[f"{name}_mask"] for tk in toks]).reshape(-1, length)
        want = np.asarray(text(frozen["text_encoder"], ids, mask)).reshape(N, -1, length, t.d_model)
        for i, o in enumerate(out):
            assert o[f"{name}_embedding"].shape[-2] <= length  # stored cut after the last real token
            got = records.pad_embedding(o[f"{name}_embedding"], length).reshape(-1, length, t.d_model)
            np.testing.assert_allclose(got, want[i], rtol=1e-5, atol=1e-5, err_msg=name)
    empty = encode.read_empty_text(encoded)
    for k in encode.EMPTY_KEYS:
        np.testing.assert_allclose(empty[k], np.asarray(frozen[k]), rtol=1e-5, atol=1e-6, err_msg=k)
    m = records.load_manifest(encoded)
    assert m["num_records"] == N and [s["num_records"] for s in m["shards"]] == [4, 2]
    assert m["latents"] == config.autoencoder.to_dict()
    assert m["text_embeddings"] == loader.text_settings(config)


def test_process_shares_make_the_one_process_folder(config, prepared, encoders, encoded, tmp_path):
    """Process p encodes the shards j with j % P == p; the last to finish writes the manifest, and the folder is
    the one process' folder. (The real 2 processes x 4 devices run: the slow test below.)"""
    out = str(tmp_path / "shares")
    first = encode.encode(prepared, out, config, encoders, records_per_shard=PER_SHARD, process_index=1,
                          process_count=2)
    assert first.records == 2 and not first.complete  # shard 1 only; shard 0 is process 0's
    assert not os.path.exists(os.path.join(out, records.MANIFEST))
    second = encode.encode(prepared, out, config, encoders, records_per_shard=PER_SHARD, process_index=0,
                           process_count=2)
    assert second.records == 4 and second.complete
    _assert_same_records(out, encoded)


def test_interrupted_encoding_resumes_to_the_same_output(config, prepared, encoders, encoded, tmp_path):
    out = str(tmp_path / "killed")
    with pytest.raises(encode.EncodeInterrupted):
        encode.encode(prepared, out, config, encoders, records_per_shard=PER_SHARD, interrupt_at_shard=1)
    names = os.listdir(out)
    assert "records-00000.json" in names and "records-00001.json" not in names
    assert any(storage.TMP_MARK in n for n in names)  # the partial shard, as a kill leaves it
    assert records.MANIFEST not in names
    summary = encode.encode(prepared, out, config, encoders, records_per_shard=PER_SHARD)
    assert summary.complete and summary.shards_skipped == 1 and summary.shards_done == 1
    _assert_same_records(out, encoded)
    # other settings into the same folder: refused, naming the file
    with pytest.raises(ValueError, match=r"encode\.json.*records_per_shard"):
        encode.encode(prepared, out, config, encoders, records_per_shard=3)


class _NoEncoder:
    """An autoencoder whose encoder must not run (its factors for the object ids; its decoder for samples)."""

    def __init__(self, ae):
        self.time_factor, self.space_factor, self.latent_channels = ae.time_factor, ae.space_factor, ae.latent_channels
        self.decode = ae.decode

    def encode(self, video):
        raise AssertionError("the autoencoder's encoder ran in a step that has cached latents")


def _compiled(fn, *args):
    """`fn(*args)` compiled with LLVM -O0 (fast CPU compiles; values as eager)."""
    return jax.jit(fn).lower(*args).compile(compiler_options={"xla_backend_optimization_level": 0})(*args)


def _configs(config, prepared, encoded, total_steps=1):
    pixels = config_lib.validate(_with(config, prepared_path=prepared, cached=False, total_steps=total_steps))
    cached = config_lib.validate(_with(config, prepared_path=encoded, cached=True, total_steps=total_steps))
    return pixels, cached


def _no_encoders(mods):
    """The modules without a text encoder or an autoencoder encoder: a step that ran either would fail."""
    return modules_lib.Modules(model=mods.model, text_encoder=None, autoencoder=_NoEncoder(mods.autoencoder),
                               tokenizer=None)


def test_training_from_the_cache_equals_training_from_pixels(config, prepared, encoded, stage):
    """The train step's loss (and gradients) on the same examples: from pixels + the text encoder, and from the
    cache with no text encoder loaded (`init_frozen(..., cached=True)`) and no encoder in the modules."""
    pixels, cached = _configs(config, prepared, encoded)
    b_pix = next(loader.make_train_iterator(pixels, process_index=0, process_count=1, workdir="/x"))
    b_cache = next(loader.make_train_iterator(cached, process_index=0, process_count=1, workdir="/x"))
    for k in ("object_masks", "caption_tokens", "caption_mask", "local_tokens", "local_mask"):
        np.testing.assert_array_equal(b_cache[k], b_pix[k], err_msg=k)  # the same examples reach both runs
    ae = make_autoencoder(config.autoencoder)
    np.testing.assert_allclose(b_cache["video_latent"], ae.encode(b_pix["video"] / 127.5 - 1.0), atol=1e-6)
    assert "video" not in b_cache and "trajectory" not in b_cache  # pixels stay on disk
    t, b = config.text_encoder, config.train.batch_size
    assert b_cache["caption_embedding"].shape == (b, t.max_length, t.d_model)
    assert b_cache["local_embedding"].shape == (b, config.data.max_objects + 1, t.local_max_length, t.d_model)
    assert "caption_embedding" not in b_pix and "video_latent" not in b_pix
    mods, frozen_pixels, mesh, rules = stage  # the text encoder of the pixels run
    init = params_lib.make_init_params(pixels, mods)
    params = _compiled(lambda r: sharding_lib.unbox(init(r)), jax.random.key(0))
    frozen_cached, _ = frozen_lib.init_frozen(cached, mods, mesh, rules, cached=True)  # as loop.train calls it
    assert "text_encoder" not in frozen_cached and "text_encoder" in frozen_pixels
    out = []
    for c, m, batch, frozen in ((pixels, mods, b_pix, frozen_pixels),
                                (cached, _no_encoders(mods), b_cache, frozen_cached)):
        batch = {k: v for k, v in batch.items() if k in inputs_lib.BATCH_KEYS}
        grad = jax.value_and_grad(step_lib.make_loss_fn(c, m), has_aux=True)

        def loss_and_norm(p, f, bt, grad=grad, c=c):  # the step's randomness (`inputs.draw`) and loss
            rand = inputs_lib.draw(jax.random.key(1), b, config_lib.latent_shape(c), c.objective)
            (loss, _), g = grad(p, f, bt, rand)
            return loss, optax.global_norm(g)

        out.append([float(x) for x in _compiled(loss_and_norm, params, frozen, batch)])
    np.testing.assert_allclose(out[1][0], out[0][0], rtol=1e-5)
    np.testing.assert_allclose(out[1][1], out[0][1], rtol=1e-4)


@pytest.mark.slow
def test_training_loop_from_the_cache_equals_training_from_pixels(config, prepared, encoded, tmp_path):
    """Two steps of `loop.train` each way: the same losses; the cached run without any encoder."""
    pixels, cached = _configs(config, prepared, encoded, total_steps=2)
    ref = loop.train(pixels, str(tmp_path / "pixels"), modules=fx.make_modules(pixels))
    res = loop.train(cached, str(tmp_path / "cached"), modules=_no_encoders(fx.make_modules(cached)))
    losses = [[h[1]["loss"] for h in r.history] for r in (ref, res)]
    assert len(losses[0]) == 2
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-5, atol=1e-6)


def _with(config, *, prepared_path, cached, total_steps):
    c = ml_collections.ConfigDict(config.to_dict())
    c.data.prepared_path = prepared_path
    c.data.cached = cached
    c.data.num_workers = 0
    c.train.total_steps = total_steps
    return c


def test_cached_config_checks_name_the_file_and_the_fix(config, prepared, encoded, monkeypatch):
    c = _with(config, prepared_path="", cached=True, total_steps=1)
    with pytest.raises(config_lib.ConfigError, match=r"data\.cached.*prepared_path.*ttm_jax\.data\.encode"):
        config_lib.validate(c)
    # a prepared folder without the cached fields: refused at preflight, naming its manifest and the encoder
    c = config_lib.validate(_with(config, prepared_path=prepared, cached=True, total_steps=1))
    with pytest.raises(config_lib.ConfigError, match=r"manifest\.json.*text_embeddings.*python -m ttm_jax\.data\."
                                                     r"encode"):
        preflight.check_paths(c)
    # embeddings of another text encoder: refused, naming the field
    other = _with(config, prepared_path=encoded, cached=True, total_steps=1)
    other.text_encoder.num_layers = 2
    with pytest.raises(config_lib.ConfigError, match=r"text_encoder\.num_layers"):
        preflight.check_paths(config_lib.validate(other))
    preflight.check_paths(config_lib.validate(_with(config, prepared_path=encoded, cached=True, total_steps=1)))
    # the same model computed in another dtype, or its weights at another path: used, with a warning
    loose = _with(config, prepared_path=encoded, cached=True, total_steps=1)
    loose.text_encoder.dtype = "bfloat16" if loose.text_encoder.dtype != "bfloat16" else "float32"
    logged = []
    monkeypatch.setattr(loader.logging, "warning", lambda msg, *args: logged.append(msg % args))
    preflight.check_paths(config_lib.validate(loose))
    assert any("text_encoder.dtype" in line and "used as they are" in line for line in logged)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli(prepared, out, *extra, env=None):
    cmd = [sys.executable, "-m", "ttm_jax.data.encode", f"--prepared={prepared}", f"--out={out}",
           f"--config={os.path.join(ROOT, 'configs', 'stage2.py')}:tiny", f"--records_per_shard={PER_SHARD}",
           "--config.mesh.distributed=auto", *_TINY_FLAGS, *extra]
    return subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


# the command line's config is train_fixtures.tiny_config(2), as flags
_TINY_FLAGS = [
    "--config.model.dim=32", "--config.model.num_layers=2", "--config.model.num_heads=2", "--config.model.ffn_dim=64",
    "--config.model.text_dim=16", "--config.model.freq_dim=16", "--config.model.ttm_layers=1",
    "--config.text_encoder.d_model=16", "--config.text_encoder.num_layers=1", "--config.text_encoder.num_heads=2",
    "--config.text_encoder.d_kv=8", "--config.text_encoder.d_ff=32", "--config.text_encoder.max_length=8",
    "--config.text_encoder.local_max_length=4", "--config.data.num_frames=5", "--config.data.height=16",
    "--config.data.width=16", "--config.data.max_objects=2", "--config.autoencoder.space_factor=4",
    "--config.autoencoder.latent_channels=192", "--config.model.patch_size=(1, 2, 2)",
]


def _wait(procs):
    outs = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        outs.append(out)
    return outs


@pytest.mark.slow
def test_two_processes_one_device_and_a_killed_command_line(config, prepared, encoded, tmp_path):
    """2 processes x 4 CPU devices through `jax.distributed` encode exactly the one-process records (8 devices), as
    does one device; the command line SIGKILLed mid-shard resumes to them too."""
    encoded_config = config
    out = str(tmp_path / "two")
    port = _free_port()
    procs = [_cli(prepared, out, env={"XLA_FLAGS": "--xla_force_host_platform_device_count=4",
                                      "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2",
                                      "JAX_PROCESS_ID": str(i)}) for i in range(2)]
    for i, (p, o) in enumerate(zip(procs, _wait(procs), strict=True)):
        assert p.returncode == 0, o[-4000:]
        assert f"encode: process {i}/2: shard {i} " in o and "clips/s" in o, o[-4000:]  # its own share
    _assert_same_records(out, encoded, exact=False)
    # one device instead of eight, other batches: the same records
    one = frozen_lib.make_encoders(encoded_config, frozen_lib.encoding_mesh(encoded_config, jax.devices()[:1]))
    encode.encode(prepared, str(tmp_path / "one"), encoded_config, one, records_per_shard=PER_SHARD, batch_size=3)
    _assert_same_records(str(tmp_path / "one"), encoded, exact=False)
    killed = str(tmp_path / "killed")
    p = _cli(prepared, killed, env={"TTM_ENCODE_KILL_AT_SHARD": "1"})
    (o,) = _wait([p])
    assert p.returncode != 0 and not os.path.exists(os.path.join(killed, records.MANIFEST)), o[-2000:]
    p = _cli(prepared, killed)
    (o,) = _wait([p])
    assert p.returncode == 0 and "1 already done" in o, o[-4000:]
    _assert_same_records(killed, encoded, exact=False)
    shutil.rmtree(killed)


def test_describe_shows_the_frozen_encoders_gone_with_cached_data(config):
    full = describe.describe(config, flops=False, print_fn=lambda line: None)
    lines = []
    c = _with(config, prepared_path="/encoded", cached=True, total_steps=1)
    out = describe.describe(config_lib.validate(c), flops=False, print_fn=lines.append)
    assert full["text_encoder"] > 0 and out["text_encoder"] == 0 and out["autoencoder"] == 0
    assert out["params"] == out["trainable"] == full["trainable"] == full["params"] - full["text_encoder"]
    assert any(line.startswith("text encoder (t5): cached, not loaded") for line in lines)
    # the encoders' FLOPs per step that the cache saves: the text encoder's (space_to_depth spends none)
    flops = describe.frozen_encoder_flops(config)
    assert flops["text_encoder"] > 0 and flops["autoencoder"] == 0
