"""Trajectories: palette colour <-> id both ways, lower id wins (same rule as models/masks.py), colours survive a real
H.264 encode/decode and VAE-like noise, object choice by size and motion in a stable order."""

import itertools

import numpy as np
import pytest

from ttm_jax.data import trajectory as tj
from ttm_jax.data import video_io


def _moving_blobs(t=9, h=64, w=96, k=4, seed=0):
    """bool [T, H, W, K]: K overlapping ellipses moving on straight lines."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    out = np.zeros((t, h, w, k), bool)
    for j in range(k):
        cy, cx = rng.uniform(0.25, 0.75) * h, rng.uniform(0.2, 0.8) * w
        vy, vx = rng.uniform(-2, 2), rng.uniform(-3, 3)
        ry, rx = rng.uniform(6, 14), rng.uniform(8, 18)
        for i in range(t):
            out[i, ..., j] = ((yy - cy - vy * i) / ry) ** 2 + ((xx - cx - vx * i) / rx) ** 2 <= 1
    return out


def test_palette_is_a_bijection_with_black_background():
    assert tj.PALETTE.shape == (tj.MAX_OBJECTS + 1, 3) and tj.MAX_OBJECTS == 26
    assert tj.color_of(0) == (0, 0, 0)
    assert len({tuple(c) for c in tj.PALETTE.tolist()}) == len(tj.PALETTE)
    for i in range(tj.MAX_OBJECTS + 1):
        assert tj.id_of(tj.color_of(i)) == i
    d = np.linalg.norm(tj.PALETTE[:, None].astype(float) - tj.PALETTE[None].astype(float), axis=-1)
    d[np.diag_indices_from(d)] = np.inf
    assert d.min() >= 127  # all colours far apart ...
    assert d[:8, :8].min() >= 255  # ... and the ones a 4- or 7-object clip uses, farther
    with pytest.raises(ValueError, match="not a palette colour"):
        tj.id_of((1, 2, 3))
    with pytest.raises(ValueError, match="max_objects"):
        tj.color_of(tj.MAX_OBJECTS + 1)


def test_lower_id_wins_like_models_masks():
    m = np.random.default_rng(1).random((3, 5, 7, 4)) < 0.4
    ids = tj.ids_from_masks(m)
    for idx in itertools.product(*(range(s) for s in m.shape[:3])):
        on = np.flatnonzero(m[idx])
        assert ids[idx] == (on[0] + 1 if on.size else 0)
    excl = tj.masks_from_ids(ids, 4)
    assert excl.sum(-1).max() <= 1 and np.array_equal(excl.any(-1), m.any(-1))
    # the models' token ids, at a 1x1 token, read the same winner from the same masks
    masks_mod = pytest.importorskip("ttm_jax.models.masks")
    tok = np.asarray(masks_mod.token_ids_from_masks(m[None, :1], time_factor=1, space_factor=1,
                                                    patch_size=(1, 1, 1)))
    np.testing.assert_array_equal(tok.reshape(ids[:1].shape), ids[:1])


def test_render_and_invert_exactly():
    m = _moving_blobs(k=7)
    traj = tj.render(m)
    assert traj.dtype == np.uint8 and traj.shape == m.shape[:3] + (3,)
    ids = tj.ids_from_masks(m)
    np.testing.assert_array_equal(traj, tj.PALETTE[ids])
    np.testing.assert_array_equal(tj.ids_from_trajectory(traj, 7), ids)
    np.testing.assert_array_equal(tj.masks_from_trajectory(traj, 7), tj.masks_from_ids(ids, 7))
    # only the clip's own colours are candidates: with 3 objects, colours 4..7 are read as one of 0..3
    assert tj.ids_from_trajectory(traj, 3).max() <= 3


@pytest.mark.parametrize("k,pix_fmt", [(4, "yuv420p"), (7, "yuv420p"), (12, "yuv444p")])
def test_colours_survive_h264(k, pix_fmt):
    m = _moving_blobs(t=9, h=96, w=128, k=k, seed=k)
    ids = tj.ids_from_masks(m)
    decoded = video_io.read_frames(video_io.encode_video(tj.render(m), 12.0, crf=23, pix_fmt=pix_fmt))
    assert not np.array_equal(decoded, tj.render(m))  # the codec really was lossy
    got = tj.ids_from_trajectory(decoded, k)
    acc = (got == ids).mean()
    print(f"H.264 crf=23 {pix_fmt} K={k}: {acc:.4%} of pixels read back to the right id")
    assert acc >= 0.99
    # per object, not only on average: no object's pixels are mostly lost
    for j in range(1, k + 1):
        sel = ids == j
        if sel.sum() > 50:
            assert (got[sel] == j).mean() >= 0.95


def test_vae_like_noise_and_dim_black():
    rng = np.random.default_rng(0)
    m = _moving_blobs(k=4)
    ids = tj.ids_from_masks(m)
    x = tj.render(m).astype(np.float32) / 127.5 - 1.0  # model-side [-1, 1]
    noisy = x + rng.normal(0, 0.15, x.shape).astype(np.float32)
    assert (tj.ids_from_trajectory(noisy, 4) == ids).mean() >= 0.99
    # dim noise on black (below the threshold) is background, even where it is nearer some colour than black
    dim = rng.integers(0, 48, size=(32, 32, 3)).astype(np.uint8)
    dim[0, 0] = (47, 0, 0)
    assert not tj.ids_from_trajectory(dim, 4).any()


def test_choice_and_ids_do_not_depend_on_memory_layout():
    """`sav.Annotation.masks` returns a transposed (masklet-major, column-major) view: scores, choice and ids read it
    exactly as a C-contiguous copy."""
    m = _moving_blobs(t=6, h=40, w=56, k=5)
    strided = np.ascontiguousarray(m.transpose(0, 3, 2, 1)).transpose(0, 3, 2, 1)
    assert not strided.flags.c_contiguous and np.array_equal(strided, m)
    for a, b in zip(tj.object_scores(strided, motion_weight=0.7), tj.object_scores(m, motion_weight=0.7), strict=True):
        np.testing.assert_array_equal(a, b)
    assert tj.select_objects(strided[:, 4:36, 8:50], 3, min_area=0.01) == tj.select_objects(m[:, 4:36, 8:50], 3,
                                                                                            min_area=0.01)
    ids = tj.ids_from_masks(strided[..., [4, 1, 2]])
    np.testing.assert_array_equal(ids, tj.ids_from_masks(m[..., [4, 1, 2]]))
    assert ids.dtype == np.int32 and ids.shape == m.shape[:3] and set(np.unique(ids)) == {0, 1, 2, 3}
    np.testing.assert_array_equal(tj.ids_from_masks(m[..., :0]), np.zeros(m.shape[:3], np.int32))
    np.testing.assert_array_equal(tj.render_ids(ids), tj.PALETTE[ids])


def test_object_scores_and_choice():
    t, h, w = 5, 40, 40
    m = np.zeros((t, h, w, 5), bool)
    m[:, 0:20, 0:20, 0] = True  # big, still
    for i in range(t):
        m[i, 22:32, 2 + 6 * i:12 + 6 * i, 1] = True  # small, moving fast
        m[i, 22:32, 26:36, 2] = True  # small, still: same size as 1
    m[1:, 0:8, 30:38, 3] = True  # appears after frame 0
    m[:, 38:39, 38:39, 4] = True  # one pixel: below min_area
    size, motion, score = tj.object_scores(m)
    assert size[1] == size[2] and motion[1] > 0.5 and motion[2] == 0 and motion[0] == 0
    assert score[1] > score[2]
    chosen = tj.select_objects(m, 2, min_area=0.01)
    assert chosen == [0, 1]  # biggest + the moving one over the still one of equal size; masklet order
    assert tj.select_objects(m, 10, min_area=0.01) == [0, 1, 2]  # 3 absent at frame 0, 4 too small
    assert tj.select_objects(m, 10) == [0, 1, 2, 4]
    assert tj.select_objects(m, 10, min_area=0.01, candidates=[2, 3]) == [2]
    assert tj.select_objects(m, 0) == []
    # stable: the same objects, whatever order the masklets come in
    perm = np.array([4, 2, 0, 3, 1])
    chosen_p = tj.select_objects(m[..., perm], 2, min_area=0.01)
    assert sorted(perm[chosen_p].tolist()) == chosen and chosen_p == sorted(chosen_p)
