"""video_io: the real H.264 sample decodes to its documented size and length; selected frames are the right frames
(frame-index stamps through a real libx264 encode); damaged files are SkipVideo naming the file."""

import hashlib
import io
import os
import pickle
from fractions import Fraction

import av
import numpy as np
import pytest
from sample_data import SAV_SAMPLE, needs_sample

from ttm_jax.data import synthetic, video_io
from ttm_jax.data.video_io import SkipVideo

SAMPLE = SAV_SAMPLE
DOG = os.path.join(SAMPLE, "01_dog.mp4")
real_sample = needs_sample("01_dog.mp4")

N_STAMPED = 40


def _stamped(n, h=48, w=176, seed=0):
    """n frames of texture with each frame's index stamped in the top row of blocks."""
    rng = np.random.default_rng(seed)
    base = rng.integers(40, 200, size=(h, w, 3), dtype=np.uint8)
    for i in range(n):
        yield video_io.stamp_frame_index(np.roll(base, i, axis=1), i)


@pytest.fixture(scope="module")
def stamped_mp4():
    return video_io.encode_video(_stamped(N_STAMPED), 24.0, crf=23)


@real_sample
def test_real_mp4_frame_count_and_size():
    info = video_io.probe(DOG)
    assert (info.height, info.width, info.num_frames) == (720, 1280, 289)
    assert abs(info.fps - 30000 / 1001) < 1e-6
    # the decoder, not the header, decides: frame 288 decodes, and no 290th frame exists
    want = [288, 0, 250, 251, 284]
    seq = video_io.read_frames(DOG, want, seek=False)
    assert seq.shape == (5, 720, 1280, 3) and seq.dtype == np.uint8
    assert not np.array_equal(seq[0], seq[1])  # a moving dog: first and last frames differ
    with pytest.raises(SkipVideo, match="01_dog.mp4") as e:
        video_io.read_frames(DOG, [289], seek=False)
    assert e.value.reason == "truncated_video"
    # seeking to the keyframe at 250 reads the very same frames
    np.testing.assert_array_equal(video_io.read_frames(DOG, want[2:]), seq[2:])


def test_selected_frames_are_the_requested_frames(stamped_mp4):
    everything = video_io.read_frames(stamped_mp4)
    assert everything.shape == (N_STAMPED, 48, 176, 3)
    np.testing.assert_array_equal(video_io.read_frame_index(everything), np.arange(N_STAMPED))
    # unordered, repeated, sparse: the output follows the request exactly
    want = np.array([17, 3, 3, 39, 0, 22])
    got = video_io.read_frames(stamped_mp4, want)
    np.testing.assert_array_equal(video_io.read_frame_index(got), want)
    np.testing.assert_array_equal(got, everything[want])


def test_stamps_survive_a_lossy_encode():
    frames = np.stack(list(_stamped(1023 + 1, h=16, w=160)))[[0, 1, 511, 512, 1023]]
    np.testing.assert_array_equal(video_io.read_frame_index(frames), [0, 1, 511, 512, 1023])
    decoded = video_io.read_frames(video_io.encode_video(frames, 24.0, crf=35))
    np.testing.assert_array_equal(video_io.read_frame_index(decoded), [0, 1, 511, 512, 1023])


def _vfr_mp4(n=30, gap_at=10, gap=5):
    """A variable-frame-rate mp4: frame i has timestamp i, then i + gap from frame `gap_at` on; gop 4."""
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as c:
        s = c.add_stream("libx264", rate=24)
        s.width, s.height, s.pix_fmt = 176, 48, "yuv420p"
        s.codec_context.gop_size = 4
        for i, img in enumerate(_stamped(n)):
            f = av.VideoFrame.from_ndarray(img, format="rgb24")
            f.pts, f.time_base = (i if i < gap_at else i + gap), Fraction(1, 24)
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return buf.getvalue()


def test_seeking_reads_the_same_frames_as_decoding_from_the_start():
    cfr = video_io.encode_video(_stamped(120), 24.0, gop=8)
    rng = np.random.default_rng(0)
    for _ in range(6):
        want = rng.choice(120, size=5)
        got = video_io.read_frames(cfr, want)
        np.testing.assert_array_equal(video_io.read_frame_index(got), want)
        np.testing.assert_array_equal(got, video_io.read_frames(cfr, want, seek=False))
    # variable frame rate: timestamps skip 5 frames after frame 10; the frames are still numbered as decoded
    vfr = _vfr_mp4()
    np.testing.assert_array_equal(video_io.read_frame_index(video_io.read_frames(vfr, [20, 25, 29])), [20, 25, 29])
    with pytest.raises(SkipVideo) as e:
        video_io.read_frames(vfr, [30])
    assert e.value.reason == "truncated_video"


def test_write_video_and_read_back(tmp_path, stamped_mp4):
    frames = video_io.read_frames(stamped_mp4, range(8))
    path = tmp_path / "sub" / "clip.mp4"
    video_io.write_video(path, frames, 12.0, crf=0, pix_fmt="yuv444p")
    info = video_io.probe(path)
    assert (info.num_frames, info.height, info.width, info.fps) == (8, 48, 176, 12.0)
    back = video_io.read_frames(str(path))
    # crf=0 4:4:4 is lossless in YUV; only the RGB<->YUV rounding remains
    assert np.abs(back.astype(int) - frames.astype(int)).max() <= 3


def test_truncated_mp4_is_skipped_with_its_name(tmp_path, stamped_mp4):
    cut = tmp_path / "sav_000042.mp4"
    cut.write_bytes(stamped_mp4[: len(stamped_mp4) // 2])
    with pytest.raises(SkipVideo, match="sav_000042.mp4") as e:
        video_io.read_frames(str(cut), [N_STAMPED - 1])
    assert e.value.reason in ("truncated_video", "unreadable_video")


def test_garbage_and_missing_files_are_skipped(tmp_path):
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(os.urandom(4096))
    for bad in (str(junk), str(tmp_path / "absent.mp4")):
        with pytest.raises(SkipVideo, match=os.path.basename(bad)) as e:
            video_io.read_frames(bad, [0])
        assert e.value.reason == "unreadable_video"
    with pytest.raises(SkipVideo, match="<in-memory video>"):
        video_io.read_frames(b"\x00" * 100, [0])


def test_skipvideo_pickles_with_its_reason():
    e = pickle.loads(pickle.dumps(SkipVideo("rle_size", "a.json", "bad")))
    assert (e.reason, e.file, str(e)) == ("rle_size", "a.json", "a.json: bad [rle_size]")


def test_encode_rejects_odd_sizes_and_bad_dtypes():
    with pytest.raises(ValueError, match="odd side"):
        video_io.encode_video(np.zeros((2, 15, 16, 3), np.uint8), 24.0)
    with pytest.raises(ValueError, match="uint8"):
        video_io.encode_video(np.zeros((2, 16, 16, 3), np.float32), 24.0)
    # yuv444p has no chroma subsampling, so odd sides are fine there
    odd = video_io.read_frames(video_io.encode_video(np.full((2, 15, 17, 3), 128, np.uint8), 24.0,
                                                     pix_fmt="yuv444p"))
    assert odd.shape == (2, 15, 17, 3)


def test_reproducible_encode_ignores_what_the_process_freed_before():
    """x264's AVX-512 code reads memory it never wrote on small frames: `reproducible=True` gives the bytes of a fresh
    process whatever was freed before (here: the buffers of noise videos encoded in between)."""
    frames = synthetic.make_video(7, 0, height=64, width=64, frames=24).frames
    rng = np.random.default_rng(0)
    digests = set()
    for _ in range(6):
        video_io.encode_video(rng.integers(0, 256, (24, 64, 64, 3), dtype=np.uint8), 24.0)
        digests.add(hashlib.sha256(video_io.encode_video(frames, 24, **synthetic.MP4_SETTINGS)).hexdigest())
    assert len(digests) == 1
