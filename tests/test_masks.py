"""Object ids for masked attention (ttm_jax/models/masks.py), against hand-built cases and a loop-based oracle."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ttm_jax.models import masks


def _latent_frame(f: int, tf: int) -> int:
    """Causal VAE: pixel frame 0 -> latent 0; frames 1+(i-1)*tf .. i*tf -> latent i."""
    return 0 if f == 0 else (f - 1) // tf + 1


def _oracle(pixel_ids: np.ndarray, num_ids: int, tf: int, sf: int, patch) -> np.ndarray:
    """Per-token plurality id by explicit loops over pixel-frames (ties -> lower id). pixel_ids [B, T, H, W]."""
    b, t, h, w = pixel_ids.shape
    pt, ph, pw = patch
    lt = 1 + (t - 1) // tf
    tt, ht, wt = lt // pt, h // (sf * ph), w // (sf * pw)
    counts = np.zeros((b, tt, ht, wt, num_ids), np.int64)
    for bi in range(b):
        for f in range(t):
            ti = _latent_frame(f, tf) // pt
            for y in range(h):
                for x in range(w):
                    counts[bi, ti, y // (sf * ph), x // (sf * pw), pixel_ids[bi, f, y, x]] += 1
    best = np.zeros((b, tt, ht, wt), np.int32)
    for idx in np.ndindex(b, tt, ht, wt):
        c = counts[idx]
        best[idx] = int(np.flatnonzero(c == c.max())[0])
    return best.reshape(b, -1)


def _pixel_ids_oracle(m: np.ndarray) -> np.ndarray:
    """Lowest-numbered object covering each pixel, 0 if none. m bool [B, T, H, W, K]."""
    out = np.zeros(m.shape[:-1], np.int32)
    for k in range(m.shape[-1] - 1, -1, -1):  # paint higher ids first so lower ids end on top
        out[m[..., k]] = k + 1
    return out


# one compiled function per shape (eager dispatch compiles every small op, which is slower on CPU)
_STATIC = ("time_factor", "space_factor", "patch_size")
_from_masks = jax.jit(masks.token_ids_from_masks, static_argnames=_STATIC)
_from_boxes = jax.jit(masks.token_ids_from_boxes, static_argnames=_STATIC)


def _tokens(m, tf=1, sf=2, patch=(1, 1, 1)):
    return np.array(_from_masks(jnp.asarray(m), time_factor=tf, space_factor=sf, patch_size=tuple(patch)))


def _box_tokens(m, tf=1, sf=2, patch=(1, 1, 1)):
    return np.array(_from_boxes(jnp.asarray(m), time_factor=tf, space_factor=sf, patch_size=tuple(patch)))


def test_area_majority_three_of_four_wins_one_of_four_loses():
    # one frame, 2x4 pixels, tokens of 2x2 pixels: token 0 = cols 0-1, token 1 = cols 2-3
    m = np.zeros((1, 1, 2, 4, 2), bool)
    m[0, 0, :, :2, 0] = True
    m[0, 0, 1, 1, 0] = False  # object 1 covers 3 of token 0's 4 pixels
    m[0, 0, 0, 2, 1] = True  # object 2 covers 1 of token 1's 4 pixels
    np.testing.assert_array_equal(_tokens(m), [[1, 0]])


def test_tie_goes_to_lower_id_and_small_object_loses_to_background():
    # 8x8 pixels, tokens of 4x4 pixels -> 2x2 tokens
    m = np.zeros((1, 1, 8, 8, 3), bool)
    m[0, 0, :4, :4, 0] = True  # object 1 fills token (0, 0)
    m[0, 0, :4, 4:6, 1] = True  # object 2: exactly half of token (0, 1): tie with background, background wins
    m[0, 0, 7, 0, 1] = True  # object 2: one pixel of token (1, 0), smaller than a token
    m[0, 0, 4:6, 4:7, 1] = True  # token (1, 1): object 2 has 6 pixels, object 3 has 5, background 5:
    m[0, 0, 6:8, 4:6, 2] = True  # plurality, not majority, decides
    m[0, 0, 6, 6, 2] = True
    assert m[0, 0, 4:, 4:, 1].sum() == 6 and m[0, 0, 4:, 4:, 2].sum() == 5
    np.testing.assert_array_equal(_tokens(m, sf=4).reshape(2, 2), [[1, 0], [0, 2]])


def test_overlaps_resolved_by_id_order_before_counting():
    # token of 4 pixels a b / c d: object 1 covers a, b; object 2 covers a, b, c. Pixel ids: 1 1 / 2 0, so object 1
    # has 2 pixels and wins, although object 2's mask alone is larger.
    m = np.zeros((1, 1, 2, 2, 2), bool)
    m[0, 0, 0, :, 0] = True
    m[0, 0, 0, :, 1] = True
    m[0, 0, 1, 0, 1] = True
    np.testing.assert_array_equal(_tokens(m), [[1]])
    # swap the ids: now the larger object is 1 and covers 3 pixels
    np.testing.assert_array_equal(_tokens(m[..., ::-1]), [[1]])
    # two objects covering a token completely: the lower id has it
    full = np.ones((1, 1, 2, 2, 3), bool)
    full[..., 0] = False
    np.testing.assert_array_equal(_tokens(full), [[2]])


def test_causal_time_grouping():
    tf, t = 4, 9  # latent frames: {0}, {1, 2, 3, 4}, {5, 6, 7, 8}
    m = np.zeros((1, t, 2, 2, 3), bool)
    m[0, 0, ..., 0] = True  # object 1 only in frame 0
    m[0, 4:9, ..., 1] = True  # object 2 in frames 4..8: 1 of 4 frames of latent 1, all of latent 2
    m[0, 1:4, ..., 2] = True  # object 3 in frames 1..3: 3 of 4 frames of latent 1
    np.testing.assert_array_equal(_tokens(m, tf=tf), [[1, 3, 2]])
    # A non-causal grouping (frames 0-3, 4-7, 8) would give object 3 latent 0 and object 2 latents 1 and 2.


def test_object_absent_from_frames_leaves_background():
    tf = 2  # latents {0}, {1, 2}, {3, 4}
    m = np.zeros((1, 5, 2, 2, 1), bool)
    m[0, 0, ..., 0] = True
    m[0, 3:5, ..., 0] = True  # absent from frames 1-2
    np.testing.assert_array_equal(_tokens(m, tf=tf), [[1, 0, 1]])


def test_zero_objects_is_all_background():
    m = np.zeros((2, 5, 8, 8, 0), bool)
    ids = _tokens(m, tf=4, sf=2, patch=(1, 2, 2))
    assert ids.shape == (2, 2 * 2 * 2) and ids.dtype == np.int32
    assert not ids.any()
    assert not np.asarray(masks.token_ids_from_boxes(jnp.asarray(m), time_factor=4, space_factor=2,
                                                     patch_size=(1, 2, 2))).any()


@pytest.mark.parametrize("tf,sf,patch", [(4, 2, (1, 2, 2)), (2, 1, (3, 2, 1))])
def test_random_masks_match_loop_oracle(tf, sf, patch):
    """Random blobby masks with overlaps: every token id equals the loop oracle (covers (t, h, w) token order)."""
    rng = np.random.default_rng(0)
    b, k = 2, 3
    t = 1 + tf * (2 if patch[0] == 1 else 5)
    h, w = 4 * sf * patch[1], 3 * sf * patch[2]
    # coarse random blocks upsampled, so tokens see real competitions rather than noise
    coarse = rng.random((b, t, h // 2 + 1, w // 2 + 1, k)) < 0.35
    m = coarse.repeat(2, axis=2).repeat(2, axis=3)[:, :, :h, :w]
    m[..., 1] |= rng.random(m.shape[:-1]) < 0.1
    want = _oracle(_pixel_ids_oracle(m), k + 1, tf, sf, patch)
    got = _tokens(m, tf=tf, sf=sf, patch=patch)
    np.testing.assert_array_equal(got, want)
    assert len(np.unique(want)) > 2  # the case is not trivial


def test_boxes_differ_from_masks_on_non_convex_object():
    # object 1: a ring of 2-pixel-thick walls around a hole of one token (tokens 2x2, 6x6 pixels -> 3x3 tokens)
    m = np.zeros((1, 1, 6, 6, 1), bool)
    m[0, 0, :, :, 0] = True
    m[0, 0, 2:4, 2:4, 0] = False
    by_mask = _tokens(m).reshape(3, 3)
    by_box = _box_tokens(m).reshape(3, 3)
    assert by_mask[1, 1] == 0 and by_box[1, 1] == 1  # the hole: background by mask, object by its box
    np.testing.assert_array_equal(by_box, np.ones((3, 3)))
    by_mask[1, 1] = 1
    np.testing.assert_array_equal(by_mask, np.ones((3, 3)))


def test_boxes_smaller_box_wins_over_lower_id():
    # object 1: an L whose box covers the whole 4x4 frame; object 2: a 2x2 block inside the corner the L leaves empty
    m = np.zeros((1, 1, 4, 4, 2), bool)
    m[0, 0, :, :2, 0] = True
    m[0, 0, 2:, :, 0] = True
    m[0, 0, :2, 2:, 1] = True
    np.testing.assert_array_equal(_box_tokens(m).reshape(2, 2), [[1, 2], [1, 1]])
    # the same with the ids swapped: the small box still wins its token
    np.testing.assert_array_equal(_box_tokens(m[..., ::-1]).reshape(2, 2), [[2, 1], [2, 2]])
    # masks agree here (no overlap); when the big object's mask also covers the corner, masks give it to id 1
    m2 = m.copy()
    m2[0, 0, :2, 2:, 0] = True
    np.testing.assert_array_equal(_tokens(m2).reshape(2, 2), [[1, 1], [1, 1]])
    np.testing.assert_array_equal(_box_tokens(m2).reshape(2, 2), [[1, 2], [1, 1]])


def test_boxes_follow_the_object_per_frame():
    # object moves: its box in each frame is where it is in that frame, not the union over time
    m = np.zeros((1, 3, 2, 4, 1), bool)
    m[0, 0, :, :2, 0] = True
    m[0, 1:, :, 2:, 0] = True
    np.testing.assert_array_equal(_box_tokens(m, tf=2).reshape(2, 2), [[1, 0], [0, 1]])


def test_jit_matches_eager():
    rng = np.random.default_rng(1)
    m = jnp.asarray(rng.random((1, 5, 8, 8, 2)) < 0.5)
    kw = dict(time_factor=4, space_factor=2, patch_size=(1, 2, 2))
    for fn, jitted in ((masks.token_ids_from_masks, _from_masks), (masks.token_ids_from_boxes, _from_boxes)):
        np.testing.assert_array_equal(jitted(m, **kw), fn(m, **kw))


@pytest.mark.parametrize("shape,field", [((1, 6, 8, 8, 1), "time_factor=4"), ((1, 5, 6, 8, 1), "data.height"),
                                         ((5, 8, 8, 1), "[B, T, H, W, K]")])
def test_geometry_errors_name_the_field(shape, field):
    with pytest.raises(ValueError, match="token_ids_from_masks") as e:
        masks.token_ids_from_masks(jnp.zeros(shape, bool), time_factor=4, space_factor=2, patch_size=(1, 2, 2))
    assert field in str(e.value)


def test_local_prompt_ids_slots_and_padding():
    rng = np.random.default_rng(2)
    tm = rng.random((2, 4, 5)) < 0.6
    ids = np.asarray(masks.local_prompt_ids(jnp.asarray(tm)))
    assert ids.shape == (2, 20) and ids.dtype == np.int32
    for b, s, j in np.ndindex(*tm.shape):
        assert ids[b, s * 5 + j] == (s if tm[b, s, j] else -1)


def test_sanitize_keeps_every_row_non_empty():
    rng = np.random.default_rng(3)
    b, lq, lk = 3, 40, 12
    kv = rng.integers(-1, 4, (b, lk)).astype(np.int32)
    kv[:, 0] = 0  # slot 0 always has a key
    kv[0, kv[0] == 2] = 3  # example 0 has no key with id 2
    q = rng.integers(-1, 6, (b, lq)).astype(np.int32)
    q[0, :4] = 2
    out = np.asarray(masks.sanitize_query_ids(jnp.asarray(q), jnp.asarray(kv)))
    assert np.asarray(masks.allowed(jnp.asarray(out), jnp.asarray(kv))).any(-1).all()
    for i, j in np.ndindex(b, lq):
        has_key = q[i, j] >= 0 and q[i, j] in kv[i]
        assert out[i, j] == (q[i, j] if has_key else 0)
    assert (out[0, :4] == 0).all() and (q[:, :] >= 4).any()  # ids 4, 5 (never keys) occurred and were remapped


def test_allowed_and_bias_reference_semantics():
    q = jnp.asarray([[0, 1, -1, 2]], jnp.int32)
    kv = jnp.asarray([[1, -1, 0, 1, 3]], jnp.int32)
    a = np.asarray(masks.allowed(q, kv))
    want = np.array([[qi == ki and ki >= 0 for ki in kv[0].tolist()] for qi in q[0].tolist()])[None]
    np.testing.assert_array_equal(a, want)
    assert not a[0, 2].any()  # a -1 query never matches -1 padding keys
    bias = np.asarray(masks.bias(q, kv))
    assert bias.shape == (1, 1, 4, 5) and bias.dtype == np.float32
    assert (bias[0, 0][a[0]] == 0).all()
    assert np.isfinite(bias).all() and (bias[0, 0][~a[0]] < -1e30).all()
