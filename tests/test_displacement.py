"""Average displacement (Farneback flow magnitude): a random texture translated by k pixels per frame, along any
direction and by non-integer steps, measures k within 0.05 px/frame; a still video measures ~0 (below 0.01: the
Farneback solve leaves a few thousandths of a pixel on identical frames)."""

import numpy as np
import pytest

pytest.importorskip("cv2", reason="displacement needs opencv-python-headless (pip install -e .[test])")

from ttm_jax.eval import displacement  # noqa: E402

TOLERANCE = 0.05  # pixels per frame; the measured error is below 0.015 on 64x64 frames
STILL = 0.01  # pixels per frame; identical frames measure ~0.004


def translated_texture(speed: float, angle_deg: float, *, size: int = 64, frames: int = 5, seed: int = 0):
    """uint8 `[frames, size, size, 3]`: a random smooth texture (24 random plane waves of 8-24 px period) moving
    `speed` pixels per frame along `angle_deg`, sampled exactly at sub-pixel offsets (no interpolation, no border)."""
    rng = np.random.default_rng(seed)
    freq, theta, phase = rng.uniform(1 / 24, 1 / 8, 24), rng.uniform(0, 2 * np.pi, 24), rng.uniform(0, 2 * np.pi, 24)
    fx, fy = (freq * np.cos(theta))[:, None, None], (freq * np.sin(theta))[:, None, None]
    vx, vy = speed * np.cos(np.deg2rad(angle_deg)), speed * np.sin(np.deg2rad(angle_deg))
    y, x = np.mgrid[:size, :size].astype(np.float64)
    out = []
    for t in range(frames):
        wave = np.sin(2 * np.pi * (fx * (x - vx * t) + fy * (y - vy * t)) + phase[:, None, None]).sum(0)
        grey = 127.5 + 115.0 * wave / np.abs(wave).max()
        out.append(np.stack([grey, 0.8 * grey + 20.0, 255.0 - grey], axis=-1))
    return np.clip(np.round(np.stack(out)), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("speed", [1.0, 1.5, 2.0, 4.0])
@pytest.mark.parametrize("angle", [0.0, 90.0, 30.0, 200.0])
def test_translation_measures_its_speed(speed, angle):
    assert displacement.video_displacement(translated_texture(speed, angle)) == pytest.approx(speed, abs=TOLERANCE)


def test_still_video_measures_zero_and_the_mean_is_per_video():
    still = np.repeat(translated_texture(0.0, 0.0, frames=1), 4, axis=0)
    assert displacement.video_displacement(still) < STILL
    result = displacement.average_displacement(np.stack([still, translated_texture(2.0, 30.0, frames=4)]))
    assert result.per_video.shape == (2,)
    assert result.per_video[0] < STILL and result.per_video[1] == pytest.approx(2.0, abs=TOLERANCE)
    assert result.mean == pytest.approx(result.per_video.mean())


def test_rejects_a_single_frame():
    with pytest.raises(ValueError, match="T >= 2"):
        displacement.video_displacement(translated_texture(1.0, 0.0, frames=1))
