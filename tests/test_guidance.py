"""InstructPix2Pix two-scale guidance: the formula, the (1, 1) identity, one batched pass equal to three calls."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ttm_jax.diffusion import guidance


class CondNet(nn.Module):
    """A small nonlinear network with an image condition (channel-concatenated) and a text condition (cross-attn)."""

    @nn.compact
    def __call__(self, x, t, cond):
        h = jnp.concatenate([x, cond["image"]], axis=-1)
        h = nn.Dense(32)(h) + nn.Dense(32)(jnp.sin(t[:, None, None] * jnp.arange(1, 5)))
        h = h + nn.MultiHeadDotProductAttention(num_heads=2)(h, nn.Dense(32)(cond["text"]))
        return nn.Dense(x.shape[-1])(nn.gelu(h))


@pytest.fixture(scope="module")
def setup():
    k = jax.random.split(jax.random.PRNGKey(0), 5)
    b = 2
    x = jax.random.normal(k[0], (b, 16, 4))
    t = jnp.array([0.3, 0.9])
    image = jax.random.normal(k[1], (b, 16, 4))
    text = jax.random.normal(k[2], (b, 5, 8))
    null_text = jax.random.normal(k[3], (b, 5, 8))  # the empty prompt's embeddings are not zeros
    conds = guidance.GuidanceConds(
        none={"image": jnp.zeros_like(image), "text": null_text},
        image={"image": image, "text": null_text},
        full={"image": image, "text": text},
    )
    net = CondNet()
    params = net.init(k[4], x, t, conds.full)
    apply = jax.jit(lambda x, t, c: net.apply(params, x, t, c))
    return apply, x, t, conds


def test_unit_scales_give_the_conditional_prediction(setup):
    apply, x, t, conds = setup
    out = guidance.guided(apply, x, t, conds, 1.0, 1.0)
    np.testing.assert_allclose(np.asarray(out), np.asarray(apply(x, t, conds.full)), atol=1e-5)


@pytest.mark.parametrize("scales", [(1.5, 3.0), (0.0, 0.0), (2.0, 0.0), (1.0, 7.5)])
def test_formula_on_separate_predictions(setup, scales):
    apply, x, t, conds = setup
    e0, ei, ef = (np.asarray(apply(x, t, c), np.float64) for c in (conds.none, conds.image, conds.full))
    want = e0 + scales[0] * (ei - e0) + scales[1] * (ef - ei)
    out = guidance.guided(apply, x, t, conds, *scales)
    np.testing.assert_allclose(np.asarray(out), want, atol=1e-4)
    # scales (0, 0): the fully unconditional prediction; (s, 0): no text influence at all
    if scales == (0.0, 0.0):
        np.testing.assert_allclose(np.asarray(out), e0, atol=1e-5)


def test_one_batched_pass_equals_three_calls(setup):
    apply, x, t, conds = setup
    calls = []

    def counting(x, t, c):
        calls.append(x.shape[0])
        return apply(x, t, c)

    batched = jax.jit(lambda x, t, c: guidance.guided(counting, x, t, c, 1.5, 4.0))(x, t, conds)
    assert calls == [3 * x.shape[0]]  # traced once, as ONE forward pass over the tripled batch
    calls.clear()
    three = guidance.guided_three_calls(counting, x, t, conds, 1.5, 4.0)
    assert calls == [x.shape[0]] * 3
    np.testing.assert_allclose(np.asarray(batched), np.asarray(three), atol=1e-5)


def test_mismatched_conditions_are_named(setup):
    apply, x, t, conds = setup
    bad = conds._replace(image={"image": conds.image["image"][:, :8], "text": conds.image["text"]})
    with pytest.raises(ValueError, match="conds.image"):
        guidance.guided(apply, x, t, bad, 1.0, 1.0)
