"""Captioning SA-V (`ttm_jax.data.caption`) against a real HTTP server on loopback that plays a VLM and an LLM.

The server answers from the synthetic videos' true captions: it recognises the video of a VLM request by comparing
the first image it was sent with every video's first frame, and the caption of a planning request by its text; each
video can be told to answer malformed, slowly or with HTTP errors. Pinned: the sidecar of a clean run is byte-equal
to the expected one (synthetic SA-V's own captions), failures are counted by reason and retried by a re-run, a run
killed in the middle of a write resumes to the same file, at most `concurrency` requests are in flight, and the
result goes through `prepare` and two training steps.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jax
import numpy as np
import pytest
import train_fixtures as fx
from PIL import Image
from pycocotools import mask as mask_utils
from sample_data import SAV_SAMPLE, needs_sample
from scipy import ndimage

from ttm_jax.clients import draw, llm
from ttm_jax.data import caption, prepare, prompt_plan, records, sav, synthetic
from ttm_jax.data import captions as captions_lib
from ttm_jax.train import loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEED, N = 3, 6


@pytest.fixture(scope="module")
def sav_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("sav"))
    synthetic.generate(out, N, seed=SEED, height=64, width=64, frames=24, videos_per_shard=3)
    return out


@pytest.fixture(scope="module")
def truth(sav_dir):
    """video id -> (true caption entry without category, object names in masklet order, first frame)."""
    entries = captions_lib.load_captions(os.path.join(sav_dir, synthetic.CAPTIONS_FILE))
    out = {}
    for i, ref in enumerate(sav.find_videos(sav_dir)):
        scene = synthetic.sample_scene(SEED, i, height=64, width=64, frames=24)
        e = entries[ref.video_id]
        out[ref.video_id] = (captions_lib.CaptionEntry(e.video_id, e.caption, e.motion_prompt, e.local_prompts),
                             [f"the {o.name}" for o in scene.objects], sav.read_frames(ref, [0])[0])
    return out


@pytest.fixture(scope="module")
def expected(truth, tmp_path_factory):
    """The expected sidecar's bytes: synthetic SA-V's captions, written by the project's own sidecar writer."""
    path = tmp_path_factory.mktemp("expected") / "captions.jsonl"
    captions_lib.write_captions(path, [t[0] for t in truth.values()])
    return path.read_bytes()


class FakeModels:
    """A ThreadingHTTPServer on 127.0.0.1 answering chat requests as a VLM and an LLM would, from the truth.

    `modes[video_id]`: "ok", "markdown" (VLM answer wrapped in markdown), "malformed_once" (VLM), "malformed" (VLM,
    always), "http500" (VLM, always), "slow_once" (VLM: the first answer comes after `slow_s`), "bad_local" (the
    local-prompts answer, always). Records every request, and the most requests it ever held at once.
    """

    def __init__(self, truth):
        self.truth = truth
        self.modes: dict[str, str] = {}
        self.slow_s = 1.0
        self.seen: dict[tuple[str, str], int] = {}  # (video id, kind) -> requests so far
        self.requests: list[tuple[str, str, dict]] = []  # (video id, kind, body)
        self.in_flight = self.max_in_flight = 0
        self.barrier: threading.Barrier | None = None  # the first two VLM requests wait here for each other
        self.lock = threading.Lock()
        self.by_caption = {t[0].caption: vid for vid, t in truth.items()}
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with outer.lock:
                    outer.in_flight += 1
                    outer.max_in_flight = max(outer.max_in_flight, outer.in_flight)
                try:
                    code, text = outer.answer(body)
                finally:
                    with outer.lock:
                        outer.in_flight -= 1
                if code != 200:
                    return self._send(code, {"error": {"message": f"status {code}"}})
                self._send(200, {"object": "chat.completion", "model": body["model"], "choices": [
                    {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}]})

            def _send(self, code, obj):
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                try:
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def reset(self, modes=None):
        """New modes and records, once the server is idle (a client that timed out leaves the request running)."""
        deadline = time.monotonic() + 30
        while self.in_flight and time.monotonic() < deadline:
            time.sleep(0.05)
        self.modes, self.seen, self.requests = dict(modes or {}), {}, []
        self.max_in_flight, self.barrier = 0, None

    def _video_of_image(self, url: str) -> str:
        img = np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB"), np.float32)
        errors = {vid: np.abs(img - t[2]).mean() for vid, t in self.truth.items() if t[2].shape == img.shape}
        return min(errors, key=errors.get)

    def answer(self, body) -> tuple[int, str]:
        msgs = body["messages"]
        request = ""
        if isinstance(msgs[1]["content"], list):  # the VLM request (a re-ask appends text turns after it)
            vid, kind = self._video_of_image(msgs[1]["content"][1]["image_url"]["url"]), "vlm"
        else:  # a planning request: its caption is the last user turn that gives one (the others are few-shot)
            request = [m["content"] for m in msgs if m["role"] == "user" and m["content"].startswith("Caption: ")][-1]
            vid = self.by_caption.get(request[len("Caption: "):].split("\n")[0])
            kind = "motion" if "motion prompts" in msgs[0]["content"] else "local"
        with self.lock:
            n = self.seen[(vid, kind)] = self.seen.get((vid, kind), 0) + 1
            self.requests.append((vid, kind, body))
            first_two = kind == "vlm" and sum(c for (_, k), c in self.seen.items() if k == "vlm") <= 2
        if vid is None:
            return 200, "I do not know this caption."
        entry, names, _ = self.truth[vid]
        mode = self.modes.get(vid, "ok")
        if kind == "vlm":
            if self.barrier is not None and first_two:
                try:
                    self.barrier.wait()
                except threading.BrokenBarrierError:
                    pass
            good = "Objects: " + " ".join(f"[Object {i + 1}: {n_}]" for i, n_ in enumerate(names))
            good += f"\nCaption: {entry.caption}"
            if mode == "http500":
                return 500, ""
            if mode == "slow_once" and n == 1:
                time.sleep(self.slow_s)
            if mode == "malformed" or (mode == "malformed_once" and n == 1):
                return 200, "I see some shapes moving around on a background."
            if mode == "markdown":
                return 200, f"Sure! Here is the description.\n\n```\n**{good}**\n```"
            return 200, good
        if kind == "motion":
            return 200, f"Answer: {entry.motion_prompt}"
        # the local request must carry the VLM's names, in masklet order
        want_names = "Objects, in this order: " + "; ".join(f"Object {i + 1}: {n_}" for i, n_ in enumerate(names))
        if mode == "bad_local" or want_names not in request:
            return 200, "The objects are several shapes."
        return 200, prompt_plan.format_local_answer([entry.local_prompts[str(k)] for k in range(len(names))])


@pytest.fixture(scope="module")
def models(truth):
    m = FakeModels(truth)
    yield m
    m.httpd.shutdown()
    m.httpd.server_close()


def endpoint(models, **kw):
    """The chat client the command line builds, its failures raised as `caption.RequestFailed`."""
    client = llm.ChatClient(models.url, model="fake-vlm", timeout=kw.pop("timeout", 5.0), retries=1, backoff=0.01,
                            **kw)

    def complete(messages):
        try:
            return client.complete(messages)
        except llm.LLMError as e:
            raise caption.RequestFailed(str(e)) from None

    return complete


def run(sav_dir, out, models, modes=None, **settings):
    models.reset(modes)
    kw = {"concurrency": 3, **settings}
    timeout = kw.pop("timeout", 5.0)
    stream = io.StringIO()
    summary = caption.caption_all(sav_dir, str(out), endpoint(models, timeout=timeout), None,
                                  caption.Settings(**kw), progress=stream)
    return summary, stream.getvalue()


def test_clean_run_writes_the_expected_sidecar(sav_dir, models, expected, tmp_path):
    out = tmp_path / "captions.jsonl"
    summary, progress = run(sav_dir, out, models)
    assert out.read_bytes() == expected
    assert summary.line() == f"videos: {N} captioned, 0 failed" and summary.already == 0
    assert progress.strip().splitlines()[-1].startswith(f"caption: {N}/{N} videos, ")
    assert "videos/s, ETA 0m00s" in progress
    # the VLM saw the video's frames, the numbers drawn on the first; the planner was asked with the caption
    vid, kind, body = next(r for r in models.requests if r[1] == "vlm")
    content = body["messages"][1]["content"]
    assert [c["type"] for c in content] == ["text"] + ["image_url"] * 4
    assert "Numbered objects: " in content[0]["text"] and body["model"] == "fake-vlm"
    assert {k for _, k, _ in models.requests} == {"vlm", "motion", "local"}
    assert len(models.requests) == 3 * N  # one request each, nothing re-asked
    # a re-run finds everything done and sends nothing
    again, _ = run(sav_dir, out, models)
    assert again.captioned == 0 and again.already == N and models.requests == []
    assert out.read_bytes() == expected


def test_malformed_slow_and_failing_answers_are_retried_then_counted(sav_dir, models, expected, truth, tmp_path):
    vids = sorted(truth)
    modes = {vids[0]: "markdown", vids[1]: "malformed_once", vids[2]: "malformed", vids[3]: "http500",
             vids[4]: "slow_once", vids[5]: "bad_local"}
    out = tmp_path / "captions.jsonl"
    models.slow_s = 2.5
    summary, _ = run(sav_dir, out, models, modes, timeout=1.0)
    assert summary.line() == ("videos: 3 captioned, 3 failed (malformed_llm_answer=1, malformed_vlm_answer=1, "
                              "request_failed=1)")
    by_reason = {re.search(r"\[(\w+)\]$", m).group(1): m for m in summary.failures}
    assert vids[2] in by_reason["malformed_vlm_answer"] and "no `Caption:`" in by_reason["malformed_vlm_answer"]
    assert vids[3] in by_reason["request_failed"] and "HTTP 500" in by_reason["request_failed"]
    assert vids[5] in by_reason["malformed_llm_answer"] and "local prompts" in by_reason["malformed_llm_answer"]
    # the malformed answer was re-asked once with the error; HTTP 500 and the timeout were retried by the client
    assert models.seen[(vids[1], "vlm")] == 2 and models.seen[(vids[2], "vlm")] == 2
    reask = [b for v, k, b in models.requests if v == vids[1] and k == "vlm"][1]["messages"]
    assert reask[-2]["content"].startswith("I see some") and "could not be read" in reask[-1]["content"]
    assert models.seen[(vids[3], "vlm")] == 2 and models.seen[(vids[4], "vlm")] == 2
    assert captions_lib.load_captions(out) == {v: truth[v][0] for v in (vids[0], vids[1], vids[4])}
    # a re-run with healthy servers captions only the failed ones; the sidecar then holds every video
    again, _ = run(sav_dir, out, models)
    assert again.line() == "videos: 3 captioned, 0 failed" and again.already == 3
    assert {v for v, _, _ in models.requests} == {vids[2], vids[3], vids[5]}
    got = out.read_bytes().splitlines(keepends=True)
    assert sorted(got) == sorted(expected.splitlines(keepends=True))


def test_requests_in_flight_are_bounded(sav_dir, models, tmp_path):
    """Two videos' VLM requests wait for each other at the server (so two run at once), and never more than
    `concurrency` requests are held."""
    models.reset()
    models.barrier = threading.Barrier(2, timeout=10)
    stream = io.StringIO()
    caption.caption_all(sav_dir, str(tmp_path / "c.jsonl"), endpoint(models), None,
                        caption.Settings(concurrency=2), progress=stream)
    assert not models.barrier.broken  # the first two requests were in flight together
    assert models.max_in_flight == 2


def _cli(sav_dir, out, models, env=None):
    cmd = [sys.executable, "-m", "ttm_jax.data.caption", f"--sav={sav_dir}", f"--out={out}",
           f"--vlm_url={models.url}", "--vlm_model=fake-vlm", f"--llm_url={models.url}/v1", "--llm_model=fake-llm",
           "--concurrency=2", "--retries=1", "--backoff=0.01", "--timeout=10"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env={**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})})


def test_killed_run_resumes_to_the_same_file(sav_dir, models, expected, tmp_path):
    """The command line, SIGKILLed half-way through writing its third line, then re-run."""
    models.reset()
    out = tmp_path / "captions.jsonl"
    killed = _cli(sav_dir, out, models, {caption.KILL_ENV: "3"})
    assert killed.returncode == -9, killed.stderr[-2000:]
    data = out.read_bytes()
    assert data.count(b"\n") == 2 and not data.endswith(b"\n")  # two whole lines and a broken one
    resumed = _cli(sav_dir, out, models)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert out.read_bytes() == expected
    assert f"videos: {N - 2} captioned, 0 failed" in resumed.stdout and "(2 videos were already there)" in \
        resumed.stdout
    assert "cut a partial last line" in resumed.stderr
    assert {b["model"] for _, k, b in models.requests if k != "vlm"} == {"fake-llm"}


def test_sidecar_goes_through_prepare_and_two_training_steps(sav_dir, models, truth, tmp_path):
    out = tmp_path / "captions.jsonl"
    run(sav_dir, out, models)
    config = fx.tiny_config(2, **{"train.total_steps": 2})
    prepared = str(tmp_path / "prepared")
    summary = prepare.prepare(sav_dir, str(out), prepared, config, chunk_size=3)
    assert summary.line() == f"videos: {N} ok, 0 skipped"
    recs = [records.decode(r) for p in records.shard_paths(prepared) for r in records.read_shard(p)]
    for rec in recs:
        entry = truth[rec["video_id"]][0]
        assert rec["caption"] == entry.caption and rec["motion_prompt"] == entry.motion_prompt
        for prompt, key in zip(rec["local_prompts"], rec["masklet_keys"], strict=True):
            assert prompt == (entry.local_prompts[key] if key else "")
    config.data.prepared_path = prepared
    config.data.num_workers = 0
    res = loop.train(config, str(tmp_path / "run"), modules=fx.make_modules(config), devices=jax.devices()[:1])
    assert res.final_step == 2 and all(np.isfinite(h["loss"]) for _, h in res.history)


# ------------------------------------------------------------------------------------------------- pieces


def test_parse_describe_answer_is_tolerant_and_says_what_is_wrong():
    names, cap = caption.parse_describe_answer(
        "Here you go:\n**Objects:**\n1. the red square\n2. the blue disc\n\n**Caption:** \"A red square slides left "
        "while\n a blue disc rises.\"", 2)
    assert names == ["the red square", "the blue disc"] and cap == "A red square slides left while a blue disc rises."
    with pytest.raises(prompt_plan.PromptParseError, match="no `Caption:`"):
        caption.parse_describe_answer("Objects: [Object 1: a dog]", 1)
    with pytest.raises(prompt_plan.PromptParseError, match="object list.*1 local prompts for 2 objects"):
        caption.parse_describe_answer("Objects: [Object 1: a dog]\nCaption: A dog runs.", 2)
    with pytest.raises(prompt_plan.PromptParseError, match="empty caption"):
        caption.parse_describe_answer("Objects: [Object 1: a dog]\nCaption:   ", 1)


def test_sidecar_writer_cuts_a_partial_line_and_refuses_bad_lines_and_a_second_writer(tmp_path):
    path = str(tmp_path / "c.jsonl")
    a = captions_lib.CaptionEntry("sav_000001", "A cat jumps.", "The cat jumps.", {"0": "the cat jumps"})
    b = captions_lib.CaptionEntry("sav_000002", "A dog runs.", "The dog runs.", {"3": "the dog runs"})
    with open(path, "wb") as f:
        f.write(caption.entry_line(a) + caption.entry_line(b)[:17])
    with caption.SidecarWriter(path) as w:
        assert w.done == {"sav_000001"} and w.dropped_partial == 17
        with pytest.raises(RuntimeError, match="another captioning run is writing this file"):
            caption.SidecarWriter(path)
        w.write(b)
    assert captions_lib.load_captions(path) == {"sav_000001": a, "sav_000002": b}
    with open(path, "ab") as f:
        f.write(b'{"video_id": "sav_000003"}\n')
    with pytest.raises(captions_lib.CaptionsError, match=r"c.jsonl:3: missing field.*fix or delete that line"):
        caption.SidecarWriter(path)


def test_progress_shows_rate_and_eta():
    now = [0.0]
    stream = io.StringIO()
    bar = caption.Progress(4, stream=stream, interval=0.0, clock=lambda: now[0])
    now[0] = 2.0
    bar.update()
    now[0] = 4.0
    bar.update(failed=True)
    assert stream.getvalue().splitlines() == ["caption: 1/4 videos, 0.50 videos/s, ETA 0m06s",
                                              "caption: 2/4 videos (1 failed), 0.50 videos/s, ETA 0m04s"]


def test_numbers_are_drawn_on_the_first_frame_where_each_masklet_shows(sav_dir, tmp_path):
    """A masklet hidden on the first annotated frames is numbered on the first sent frame where it shows, one empty
    everywhere is left out; outlines are in the number's colour, on the mask's edge."""
    ref = sav.find_videos(sav_dir)[0]
    ann_json = json.loads(dict(ref.annotations)["manual"].read_bytes())
    k = len(ann_json["masklet_id"])
    empty = {"size": ann_json["masklet"][0][0]["size"], "counts": _empty_rle(64, 64)}
    for j, row in enumerate(ann_json["masklet"]):
        if j < 3:  # masklet 0 hidden on annotated frames 0..2 (video frames 0..8)
            row[0] = dict(empty)
        row.append(dict(empty))  # an extra masklet, empty everywhere
    ann_json["masklet_id"].append(99)
    ann_json["masklet_frame_count"].append(len(ann_json["masklet"]))
    ann_json["masklet_size_abs"].append(0.0)
    d = tmp_path / "sav"
    d.mkdir()
    (d / f"{ref.video_id}.mp4").write_bytes(ref.video.read_bytes())
    (d / f"{ref.video_id}_manual.json").write_text(json.dumps(ann_json))
    (r,) = sav.find_videos(str(d))
    seen = caption.vlm_images(r, num_frames=4)
    assert seen.frames == [0, 8, 12, 20] and seen.keys == [str(i) for i in range(k)]
    assert seen.shown_on == [2] + [0] * (k - 1)  # hidden on frames 0, 4 and 8: numbered on frame 12
    ann = sav.read_annotation(r)
    raw = sav.read_frames(r, seen.frames)
    for i, f in enumerate(seen.frames):
        for m in range(k):
            mask = ann.masks([f // ann.stride], [m])[0, ..., 0]
            edge = mask & ~_eroded(mask)
            drawn = (seen.images[i][edge] == draw.PALETTE[m]).all(-1).mean() if edge.any() else 0.0
            if seen.shown_on[m] == i:
                assert drawn > 0.5, (i, m)  # most edge pixels carry the colour (a label box may cover some)
            else:
                assert drawn < 0.1, (i, m)
        untouched = ~np.any(seen.images[i] != raw[i], axis=-1)
        assert untouched.mean() > 0.6  # outlines and labels only


def _empty_rle(h, w):
    return mask_utils.encode(np.zeros((h, w), np.uint8, order="F"))["counts"].decode("ascii")


def _eroded(mask):
    return ndimage.binary_erosion(mask, border_value=0)


@needs_sample("sav_000001_manual.json")
def test_real_masklets_are_numbered_at_their_label_boxes():
    """The real SA-V json (848x480, 5 masklets) scaled to 512: each label box is inside the image and carries its
    number's colour; a label goes inside its mask when it fits, else beside it."""
    ref = sav.VideoRef("sav_000001", sav.Source(""), (("manual", sav.Source(os.path.join(SAV_SAMPLE,
                                                                                       "sav_000001_manual.json"))),))
    ann = sav.read_annotation(ref)
    size = caption._scale(ann.height, ann.width, 512)
    assert max(size) == 512
    masks = caption._resize_masks(ann.masks([0])[0], size)
    image = np.full(size + (3,), 128, np.uint8)
    drawn = draw.draw_numbered(image, masks, list(range(1, ann.num_masklets + 1)))
    for m in range(ann.num_masklets):
        if not masks[..., m].any():
            continue
        x0, y0 = draw.label_box(masks[..., m], (12, 16))
        assert 0 <= x0 <= size[1] - 12 and 0 <= y0 <= size[0] - 16
        colour = np.asarray(draw.PALETTE[m])
        assert (np.abs(drawn.astype(int) - colour).sum(-1) == 0).sum() > 20, m
