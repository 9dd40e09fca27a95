"""RAFT in Flax against torchvision's `raft_small` / `raft_large` with random weights (seeded; the large context
encoder's batch-norm statistics and affine params randomised too, so a swapped mean/var would show), saved as a `.pth`
and loaded through the converter: the last flow agrees within FLOW_TOL pixels (measured max error: small 2.2e-5,
large 6.3e-6 at 3 updates, max |flow| 4.4 / 3.2 px; mean error 1.3e-6).
Frames of 131x140 (not multiples of 8) check the stated padding: the oracle runs on the same edge-padded frames (2 rows
before, 3 after; 2 columns each side) and is cropped back.

torchvision's PyPI wheel is a CUDA build: on a CPU-only torch its compiled ops (nms, roi_align, ...) do not load and
its import fails registering fake kernels for `torchvision::nms` / `qnms`. RAFT is pure Python, so this file defines
those two op schemas when the extension does not load (nothing else of torchvision's ops is used).

With real weights (`$TTM_RAFT_WEIGHTS`: torchvision's raft_large_C_T_SKHT_V2-ff5fadd5.pth or
raft_small_C_T_V2-01064c6d.pth, downloaded by hand; slow, `pytest -m slow`): a texture translated by k pixels per frame
measures k within PRETRAINED_TOL (not yet run here: no weights on this machine)."""

import functools
import glob
import importlib.util
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")

_SHIM = []  # the torch.library fragment, kept alive for the session


def _import_optical_flow():
    spec = importlib.util.find_spec("torchvision")
    if spec is None:
        pytest.skip("torchvision is not installed (pip install --no-deps torchvision==0.28.0)", allow_module_level=True)
    ext = glob.glob(os.path.join(os.path.dirname(spec.origin), "_C*.so"))
    try:
        torch.ops.load_library(ext[0])
    except (OSError, IndexError):
        lib = torch.library.Library("torchvision", "FRAGMENT")
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _SHIM.append(lib)
    try:
        from torchvision.models import optical_flow
    except Exception as e:  # noqa: BLE001 - any import failure of the oracle skips
        pytest.skip(f"torchvision does not import with torch {torch.__version__}: {e}", allow_module_level=True)
    return optical_flow


optical_flow = _import_optical_flow()

from test_displacement import translated_texture  # noqa: E402

from ttm_jax.eval import displacement, raft  # noqa: E402
from ttm_jax.weights import rulebook as rb  # noqa: E402

FLOW_TOL = 1e-4  # pixels, max abs difference of the flow
ITERS = 3
WEIGHTS_ENV = "TTM_RAFT_WEIGHTS"
PRETRAINED_TOL = 0.1  # pixels per frame
H, W = 131, 140


def torch_model(variant: str, seed: int = 0):
    torch.manual_seed(seed)
    model = {"small": optical_flow.raft_small, "large": optical_flow.raft_large}[variant](weights=None)
    gen = torch.Generator().manual_seed(seed + 1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            for buf, lo, hi in ((m.running_mean, -0.3, 0.3), (m.running_var, 0.5, 1.5), (m.weight, 0.5, 1.5),
                                (m.bias, -0.3, 0.3)):
                buf.data.copy_(torch.rand(buf.shape, generator=gen) * (hi - lo) + lo)
    return model.eval()


def frame_pairs(batch: int = 2, seed: int = 0):
    """uint8 `[batch, H, W, 3]` x2: a smoothed random image and a copy shifted by (3, -2) pixels."""
    rng = np.random.default_rng(seed)
    img = rng.uniform(0, 255, (batch, H + 8, W + 8, 3))
    img = sum(np.roll(img, (dy, dx), axis=(1, 2)) for dy in range(3) for dx in range(3)) / 9
    img = np.round(img).astype(np.uint8)
    return img[:, 4:4 + H, 4:4 + W], img[:, 6:6 + H, 1:1 + W]


def oracle_flow(model, f1: np.ndarray, f2: np.ndarray) -> np.ndarray:
    """torchvision's last flow on the edge-padded frames (the padding `raft.padding` states), cropped back."""
    (t, b), (left, r) = raft.padding(H, W)

    def prep(f):
        f = np.pad(f, ((0, 0), (t, b), (left, r), (0, 0)), mode="edge")
        return torch.from_numpy(f).permute(0, 3, 1, 2).float() / 255 * 2 - 1

    with torch.no_grad():
        out = model(prep(f1), prep(f2), num_flow_updates=ITERS)[-1]
    return out.permute(0, 2, 3, 1).numpy()[:, t:t + H, left:left + W]


@pytest.fixture(scope="module", params=["small", "large"])
def case(request, tmp_path_factory):
    variant = request.param
    model = torch_model(variant)
    path = str(tmp_path_factory.mktemp(variant) / f"raft_{variant}.pth")
    torch.save(model.state_dict(), path)
    f1, f2 = frame_pairs()
    return variant, model, path, (f1, f2), oracle_flow(model, f1, f2)


def test_flow_matches_torchvision(case):
    variant, _, path, (f1, f2), want = case
    spec, params = raft.load(path)  # variant read from the keys
    assert spec.name == variant
    got = np.asarray(raft.flow_fn(spec, ITERS)(params, f1, f2))
    assert got.shape == (2, H, W, 2) and got.dtype == np.float32
    assert np.abs(want).max() > 0.5  # a real flow, not ~0
    np.testing.assert_allclose(got, want, rtol=0, atol=FLOW_TOL)


def test_every_key_is_consumed_and_round_trips(case):
    variant, model, path, _, _ = case
    spec, params = raft.load(path, variant)
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    back = raft.to_torch(params, spec)
    assert set(back) == {k for k in sd if not k.endswith("num_batches_tracked")}
    for k, v in back.items():
        np.testing.assert_array_equal(v, sd[k], err_msg=k)
    extra = dict(sd, **{"update_block.extra.weight": np.zeros(3, np.float32)})
    with pytest.raises(rb.ConversionError, match="update_block.extra.weight"):
        raft.from_torch(extra, spec)


def test_missing_key_and_wrong_variant_name_the_file(case, tmp_path):
    variant, model, _, _, _ = case
    sd = model.state_dict()
    key = "update_block.flow_head.conv2.weight"
    del sd[key]
    path = str(tmp_path / "broken.pth")
    torch.save(sd, path)
    with pytest.raises(rb.ConversionError, match=rf"broken\.pth(.|\n)*{key}"):
        raft.load(path)
    other = "small" if variant == "large" else "large"
    with pytest.raises(ValueError, match=rf"broken\.pth.*variant='{variant}'"):
        raft.load(path, other)
    with pytest.raises(FileNotFoundError, match="download"):
        raft.load(str(tmp_path / "absent.pth"))
    torch.save({"module.fnet.conv1.weight": torch.zeros(1)}, str(tmp_path / "princeton.pth"))
    with pytest.raises(rb.ConversionError, match=r"princeton\.pth: no feature_encoder"):
        raft.load(str(tmp_path / "princeton.pth"), "large")


@pytest.mark.parametrize("case", ["small"], indirect=True)  # the plumbing is the same for both variants
def test_displacement_with_raft_is_the_oracles_mean_flow(case):
    _, model, path, (f1, f2), _ = case
    estimator = raft.RaftFlow.from_checkpoint(path, num_flow_updates=ITERS, batch_size=2)
    video = np.stack([f1[0], f2[0], f1[0]])  # pairs (f1, f2) and (f2, f1): one batch of 2
    want = oracle_flow(model, video[:-1], video[1:])
    got = displacement.average_displacement(video[None], estimator=estimator)
    expect = np.mean([np.linalg.norm(w, axis=-1).mean(dtype=np.float64) for w in want])
    assert got.per_video[0] == pytest.approx(expect, rel=1e-5)
    assert got.mean == pytest.approx(expect, rel=1e-5)
    assert displacement.video_displacement(video, estimator=estimator) == pytest.approx(expect, rel=1e-5)
    assert displacement.make_estimator(None) is displacement.farneback
    assert isinstance(displacement.make_estimator(path, num_flow_updates=ITERS), raft.RaftFlow)


def test_small_frames_are_refused():
    with pytest.raises(ValueError, match="resize"):
        raft.check_size(120, 200)
    raft.check_size(121, 128)  # pads to 128


@functools.lru_cache(maxsize=1)
def pretrained() -> raft.RaftFlow:
    return raft.RaftFlow.from_checkpoint(os.environ[WEIGHTS_ENV], batch_size=4)


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get(WEIGHTS_ENV),
                    reason=f"set ${WEIGHTS_ENV} to torchvision's raft_large_C_T_SKHT_V2-ff5fadd5.pth (download it)")
@pytest.mark.parametrize("speed, angle", [(0.0, 0.0), (1.0, 0.0), (1.5, 90.0), (2.0, 30.0), (4.0, 200.0)])
def test_pretrained_raft_measures_a_translation(speed, angle):
    video = translated_texture(speed, angle, size=128, frames=5)
    got = displacement.video_displacement(video, estimator=pretrained())
    assert got == pytest.approx(speed, abs=PRETRAINED_TOL)
