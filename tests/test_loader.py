"""Grain data loader (`ttm_jax.data.loader`): synthetic SA-V -> prepare -> batches with the contract's shapes;
determinism, host sharding, checkpointed iterator state, default data."""

import hashlib
import json
import os

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest
import train_fixtures as fx

from ttm_jax import config as config_lib
from ttm_jax.assembly.registry import make_autoencoder
from ttm_jax.data import loader, prepare, records, synthetic, trajectory
from ttm_jax.models.tokenizer import make_tokenizer

N = 12  # records; batch 4 -> 3 batches per epoch on one process, 3 of 2 on each of two


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipe")
    sav_dir = str(root / "sav")
    synthetic.generate(sav_dir, N, seed=2, height=64, width=64, frames=24, videos_per_shard=6)
    cfg = config_lib.validate(fx.tiny_at_12fps())
    out = str(root / "prepared")
    prepare.prepare(sav_dir, os.path.join(sav_dir, synthetic.CAPTIONS_FILE), out, cfg, chunk_size=4)
    return out


def _config(path, **data):
    c = fx.tiny_at_12fps()
    c.data.prepared_path = path
    c.data.num_workers = 0
    c.data.update(data)
    return config_lib.validate(c)


def _batches(config, n, *, process_index=0, process_count=1, workdir="/nonexistent"):
    it = loader.make_train_iterator(config, process_index=process_index, process_count=process_count,
                                    workdir=workdir)
    return [next(it) for _ in range(n)]


def _key(video):
    return hashlib.sha1(np.ascontiguousarray(video).tobytes()).hexdigest()


def _record_keys(path):
    return {_key(records.decode(r)["video"]) for p in records.shard_paths(path) for r in records.read_shard(p)}


def test_batch_has_the_contract_shapes_and_dtypes(prepared):
    config = _config(prepared)
    b = _batches(config, 1)[0]
    d, t = config.data, config.text_encoder
    B, T, H, W, K = config.train.batch_size, d.num_frames, d.height, d.width, d.max_objects
    want = {
        "video": (np.uint8, (B, T, H, W, 3)), "trajectory": (np.uint8, (B, T, H, W, 3)),
        "object_masks": (np.bool_, (B, T, H, W, K)), "num_objects": (np.int32, (B,)),
        "caption_tokens": (np.int32, (B, t.max_length)), "caption_mask": (np.bool_, (B, t.max_length)),
        "motion_tokens": (np.int32, (B, t.max_length)), "motion_mask": (np.bool_, (B, t.max_length)),
        "local_tokens": (np.int32, (B, K + 1, t.local_max_length)),
        "local_mask": (np.bool_, (B, K + 1, t.local_max_length)),
    }
    assert sorted(b) == sorted(want)
    for k, (dtype, shape) in want.items():
        assert b[k].dtype == dtype and b[k].shape == shape, (k, b[k].dtype, b[k].shape)


def test_batch_content_is_consistent(prepared):
    """Tokens are the record's texts; padding slots have no tokens; masks, trajectory and num_objects agree."""
    config = _config(prepared)
    b = _batches(config, 1)[0]
    by_video = {_key(r["video"]): r for r in (records.decode(x) for p in records.shard_paths(prepared)
                                              for x in records.read_shard(p))}
    tok = make_tokenizer(config.text_encoder)
    lc, lp = config.text_encoder.max_length, config.text_encoder.local_max_length
    for i in range(b["video"].shape[0]):
        rec = by_video[_key(b["video"][i])]
        ids, mask = tok.encode([rec["caption"]], lc)
        np.testing.assert_array_equal(b["caption_tokens"][i], ids[0])
        np.testing.assert_array_equal(b["caption_mask"][i], mask[0])
        ids, _ = tok.encode([rec["motion_prompt"]], lc)
        np.testing.assert_array_equal(b["motion_tokens"][i], ids[0])
        ids, _ = tok.encode([rec["caption"], *rec["local_prompts"]], lp)
        n = int(b["num_objects"][i])
        assert n == rec["num_objects"] and 1 <= n <= config.data.max_objects
        np.testing.assert_array_equal(b["local_tokens"][i, :n + 1], ids[:n + 1])  # slot 0 = caption, 1..n objects
        assert b["local_mask"][i, :n + 1].any(-1).all()
        assert not b["local_mask"][i, n + 1:].any() and not b["local_tokens"][i, n + 1:].any()
        np.testing.assert_array_equal(b["object_masks"][i], rec["object_masks"])
        assert not b["object_masks"][i, ..., n:].any() and b["object_masks"][i, 0, ..., :n].any((0, 1)).all()
        np.testing.assert_array_equal(b["trajectory"][i], trajectory.render(b["object_masks"][i]))


def test_deterministic_by_seed(prepared):
    a = _batches(_config(prepared), 4)
    b = _batches(_config(prepared), 4)
    for x, y in zip(a, b, strict=True):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    c = _batches(_config(prepared, shuffle_seed=1), 3)
    order = lambda bs: [_key(v) for bt in bs for v in bt["video"]]  # noqa: E731
    assert order(a[:3]) != order(c) and sorted(order(a[:3])) == sorted(order(c))


def test_epochs_cover_every_record_once_and_reshuffle(prepared):
    config = _config(prepared)
    bs = _batches(config, 2 * N // config.train.batch_size)
    keys = [_key(v) for b in bs for v in b["video"]]
    first, second = keys[:N], keys[N:]
    assert set(first) == set(second) == _record_keys(prepared) and len(set(first)) == N
    assert first != second  # a new order each epoch


def test_processes_read_disjoint_slices(prepared):
    config = _config(prepared)
    per = config.train.batch_size // 2
    seen = []
    for p in range(2):
        bs = _batches(config, N // 2 // per, process_index=p, process_count=2)
        assert all(b["video"].shape[0] == per for b in bs)
        seen.append([_key(v) for b in bs for v in b["video"]])
    assert len(set(seen[0])) == len(seen[0]) == N // 2
    assert not set(seen[0]) & set(seen[1])
    assert set(seen[0]) | set(seen[1]) == _record_keys(prepared)
    with pytest.raises(ValueError, match="batch_size=4 is not divisible"):
        loader.make_train_iterator(config, process_index=0, process_count=3, workdir="/x")


def test_restored_iterator_continues_on_the_next_batch(prepared, tmp_path):
    """The state survives a real Orbax checkpoint (grain's handler), as training saves it."""
    config = _config(prepared)
    it = loader.make_train_iterator(config, process_index=0, process_count=1, workdir="/x")
    for _ in range(4):  # into the second epoch
        next(it)
    with ocp.CheckpointManager(str(tmp_path / "ckpt"), item_names=("data",)) as mngr:
        mngr.save(4, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        mngr.wait_until_finished()
    want = [next(it) for _ in range(2)]
    fresh = loader.make_train_iterator(config, process_index=0, process_count=1, workdir="/x")
    with ocp.CheckpointManager(str(tmp_path / "ckpt"), item_names=("data",)) as mngr:
        mngr.restore(4, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
    got = [next(fresh) for _ in range(2)]
    for x, y in zip(want, got, strict=True):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    # and not trivially: a fresh iterator's first batch differs
    first = next(loader.make_train_iterator(config, process_index=0, process_count=1, workdir="/x"))
    assert not np.array_equal(first["video"], want[0]["video"])
    json.dumps(it.get_state())  # plain JSON, as grain's handler writes it


def test_worker_processes_give_the_same_batches(prepared):
    """config.data.num_workers=2 (Grain mp_prefetch, real worker processes) changes speed, not batches."""
    a = _batches(_config(prepared), 3)
    b = _batches(_config(prepared, num_workers=2), 3)
    for x, y in zip(a, b, strict=True):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def test_shape_mismatch_with_records_is_a_clear_error(prepared):
    config = _config(prepared, num_frames=5)
    with pytest.raises(ValueError, match=r"manifest\.json.*num_frames=9.*config\.data\.num_frames=5"):
        loader.make_train_iterator(config, process_index=0, process_count=1, workdir="/x")
    with pytest.raises(records.RecordError, match="no manifest"):
        loader.make_train_iterator(_config("/nonexistent/prep"), process_index=0, process_count=1, workdir="/x")


def test_ensure_default_data_generates_once(tmp_path):
    c = fx.tiny_at_12fps()
    c.data.synthetic_num_videos = 4
    c.data.synthetic_dir = str(tmp_path / "cache")
    workdir = str(tmp_path / "run")
    path = loader.ensure_default_data(c, workdir)
    m = records.load_manifest(path)
    assert m["num_records"] == 4 and m["data"]["num_frames"] == c.data.num_frames
    shard = records.shard_paths(path, m)[0]
    stamp = os.path.getmtime(shard)
    assert loader.ensure_default_data(c, workdir) == path and os.path.getmtime(shard) == stamp  # cached
    # the videos are long enough for a clip at the config's fps, with room for several starts
    p = loader.synthetic_params(c)
    assert p["frames"] >= 1 + (c.data.num_frames - 1) * 24 / c.data.fps and min(p["height"], p["width"]) >= 128
    b = next(loader.make_train_iterator(c, process_index=0, process_count=1, workdir=workdir))
    assert b["video"].shape == (c.train.batch_size, c.data.num_frames, c.data.height, c.data.width, 3)
    # default cache location: next to the workdir
    c.data.synthetic_dir = ""
    assert loader._cache_root(c, workdir) == str(tmp_path / "synthetic_sav")


@pytest.mark.parametrize("field,value", [("num_workers", -1), ("read_threads", -1), ("shuffle_seed", 2**32),
                                         ("synthetic_num_videos", 0)])
def test_config_rejects_bad_pipeline_values(field, value):
    c = fx.tiny_at_12fps()
    c.data[field] = value
    with pytest.raises(config_lib.ConfigError, match=rf"config\.data\.{field}"):
        config_lib.validate(c)


def test_cached_latents_reach_the_batch(tmp_path):
    sav_dir = str(tmp_path / "sav")
    synthetic.generate(sav_dir, 4, seed=3, height=64, width=64, frames=24)
    cfg = config_lib.validate(fx.tiny_at_12fps())
    out = str(tmp_path / "prepared")
    prepare.prepare(sav_dir, os.path.join(sav_dir, synthetic.CAPTIONS_FILE), out, cfg, chunk_size=4, latents=True,
                    make_autoencoder=make_autoencoder)
    b = _batches(_config(out), 1)[0]
    B = cfg.train.batch_size
    for key in ("video", "trajectory"):
        lat = b[f"{key}_latent"]
        assert lat.dtype == np.float32 and lat.shape == (B, *config_lib.latent_shape(cfg))
        # space_to_depth is exact: the cached latent of each row is that row's clip, not another one
        pixels = np.asarray(make_autoencoder(cfg.autoencoder).decode(lat))
        np.testing.assert_allclose((pixels + 1.0) * 127.5, b[key].astype(np.float32), atol=1e-3)
    # latents of another autoencoder would be silently wrong: refused
    other = _config(out)
    other.autoencoder.space_factor = 8
    other.autoencoder.latent_channels = 3 * 8 * 8 * 4
    with pytest.raises(ValueError, match=r"cached latents.*space_factor"):
        loader.make_train_iterator(other, process_index=0, process_count=1, workdir="/x")
    # ... and latents of another normalisation
    other = _config(out)
    other.autoencoder.scaling_factor = 2.0  # the cache's: the tiny default's 4.0
    with pytest.raises(ValueError, match=r"cached latents.*\{'scaling_factor': 4\.0\} but config\.autoencoder has "
                                         r"\{'scaling_factor': 2\.0\}"):
        loader.make_train_iterator(other, process_index=0, process_count=1, workdir="/x")
