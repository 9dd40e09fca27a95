"""The one rule of every command line (`ttm_jax/cli.py`): a user error is one line `error: ...` naming the flag, field
or file and the fix, exit status 2, no traceback, and nothing written. Each command runs as a real process."""

from __future__ import annotations

import json
import os
import pathlib
import re
import resource
import socket
import struct
import subprocess
import sys

import pytest

from ttm_jax import cli
from ttm_jax import config as config_lib
from ttm_jax.clients import llm
from ttm_jax.data import captions as captions_lib
from ttm_jax.data import synthetic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(module: str, *args: str, file_size_limit: int | None = None) -> subprocess.CompletedProcess:
    """`python -m module args` as a real process; `file_size_limit`: RLIMIT_FSIZE in bytes (`ulimit -f`: a write past
    it fails with EFBIG, the storage refusing it as a full disk would)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    limit = None if file_size_limit is None else (
        lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit)))
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300, preexec_fn=limit)


def _one_error_line(r: subprocess.CompletedProcess, *words: str) -> str:
    assert r.returncode == cli.EXIT_USER_ERROR, (r.returncode, r.stderr[-3000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    errors = [x for x in lines if x.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], r.stderr[-3000:]  # one line, the last thing said
    for w in words:
        assert w in errors[0], (w, errors[0])
    return errors[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------- every command, bad flags

# (module, arguments, words the line must hold); paths under {tmp} must stay unwritten
BAD_FLAGS = [
    ("ttm_jax.main", ["--workdir={tmp}/w", "--config.train.total_stepz=3"], ["total_stepz"]),
    ("ttm_jax.data.prepare", ["--sav={tmp}/nope", "--captions={tmp}/c.jsonl", "--out={tmp}/out"],
     ["--sav=", "nope"]),
    ("ttm_jax.data.prepare", ["--captions=x", "--out={tmp}/out"], ["--sav"]),
    ("ttm_jax.data.encode", ["--prepared={tmp}/nope", "--out={tmp}/out"], ["--prepared=", "prepare"]),
    ("ttm_jax.data.caption", ["--sav={tmp}/nope", "--out={tmp}/out/c.jsonl", "--vlm_url=http://127.0.0.1:9",
                              "--vlm_model=m"], ["--sav="]),
    ("ttm_jax.data.caption", ["--sav={tmp}", "--out={tmp}/out/c.jsonl", "--vlm_url=localhost:9", "--vlm_model=m"],
     ["--vlm_url", "http://"]),
    ("ttm_jax.data.label", ["--videos={tmp}/nope", "--out={tmp}/out", "--objects=dog"], ["--videos="]),
    ("ttm_jax.data.synthetic", ["--out={tmp}/out", "--rung=9"], ["--rung=9", "1, 2, 3, 4"]),
    ("ttm_jax.data.synthetic", ["--out={tmp}/out", "--framez=3"], ["framez"]),
    ("ttm_jax.convert", ["--from=diffusers:{tmp}/nope", "--to=orbax:{tmp}/out"], ["config.json", "--from=diffusers:"]),
    ("ttm_jax.convert", ["--from=diffusers:{tmp}/nope", "--to=orbax:{tmp}/out", "--dtype=fp8"], ["--dtype"]),
    ("ttm_jax.convert", ["--from=diffusers:{tmp}/nope"], ["--to"]),
    ("ttm_jax.convert", ["dit", "--from=diffusers:{tmp}/nope", "--to=orbax:{tmp}/out"], ["dit", "--from=KIND:PATH"]),
    ("ttm_jax.eval.metrics", ["--real={tmp}/nope", "--fake={tmp}/nope"], ["--real="]),
    ("ttm_jax.eval.sav128", ["--sav={tmp}/nope", "--captions={tmp}/c.jsonl", "--out={tmp}/out"], ["nope"]),
    ("ttm_jax.eval.motion_bench", ["--out={tmp}/out", "--fps=0"], ["--fps="]),
]


@pytest.mark.parametrize("module,args,words", BAD_FLAGS, ids=[f"{m.split('.')[-1]}-{i}"
                                                               for i, (m, _, _) in enumerate(BAD_FLAGS)])
def test_every_command_says_a_bad_flag_in_one_line(tmp_path, module, args, words):
    r = _run(module, *[a.format(tmp=tmp_path) for a in args])
    _one_error_line(r, *words)
    assert sorted(os.listdir(tmp_path)) == []  # nothing written


# ------------------------------------------------------------------------------------- the table of every command


def _entry_points() -> dict[str, str]:
    """`python -m` module -> source of every file in ttm_jax/ that runs as a command (`__name__ == "__main__"`)."""
    out = {}
    for path in sorted(pathlib.Path(ROOT, "ttm_jax").rglob("*.py")):
        text = path.read_text()
        if not re.search(r'^if __name__ == "__main__":$', text, re.MULTILINE):
            continue
        parts = path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__main__" else parts)] = text
    return out


def test_every_command_is_in_the_table_follows_the_pattern_and_has_a_bad_flag_case():
    """A module that runs as a command is a row of `cli.COMMANDS` (`python -m ttm_jax` lists it), is built the one
    way (`define_flags`, `main(argv)`, `cli.run`), and has a bad-flag case above."""
    found = _entry_points()
    assert set(found) - {"ttm_jax"} == set(cli.COMMANDS)  # ttm_jax/__main__.py: the list itself
    for module, text in found.items():
        assert "def define_flags(" in text and "def main(argv: Sequence[str])" in text, module
        assert "\n    define_flags()\n    cli.run(main" in text, module
        assert "argparse" not in text, module
    assert {m for m, _, _ in BAD_FLAGS} == set(cli.COMMANDS)


@pytest.mark.parametrize("module", list(cli.COMMANDS))
def test_every_command_says_an_unknown_flag_in_one_line(tmp_path, module):
    r = _run(module, "--no_such_flag=1", f"--out={tmp_path}/out")
    _one_error_line(r, "no_such_flag")
    assert sorted(os.listdir(tmp_path)) == []


def test_python_m_ttm_jax_lists_every_command():
    for args in ([], ["--help"]):
        r = _run("ttm_jax", *args)
        assert r.returncode == 0, r.stderr[-3000:]
        for module, what in cli.COMMANDS.items():
            assert f"python -m {module} " in r.stdout and what in r.stdout, (module, r.stdout)
    _one_error_line(_run("ttm_jax", "train"), "python -m ttm_jax.<module>")


# --------------------------------------------------------------------------------------------- captions sidecar


@pytest.fixture(scope="module")
def sav(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("sav"))
    synthetic.generate(out, 3, 0, frames=24, height=32, width=32, rung=1)
    return out


def _sidecar_lines(sav: str) -> list[str]:
    with open(os.path.join(sav, synthetic.CAPTIONS_FILE)) as f:
        return [x for x in f.read().splitlines() if x.strip()]


@pytest.mark.parametrize("damage,words", [
    (lambda lines: [lines[0], lines[1][:-7], lines[2]], [":2:", "not valid JSON", "one JSON object"]),
    (lambda lines: [lines[0], lines[1], lines[1]], [":3:", "appears twice", "one line per video"]),
    (lambda lines: [lines[0], json.dumps({"video_id": "x", "caption": "c"})], [":2:", "motion_prompt"]),
], ids=["malformed", "listed_twice", "missing_field"])
def test_prepare_fails_on_a_bad_sidecar_line_before_any_work(sav, tmp_path, damage, words):
    side = tmp_path / "captions.jsonl"
    side.write_text("\n".join(damage(_sidecar_lines(sav))) + "\n")
    r = _run("ttm_jax.data.prepare", f"--sav={sav}", f"--captions={side}", f"--out={tmp_path / 'out'}")
    line = _one_error_line(r, str(side), *words)
    assert line.count(str(side)) == 1  # one cause, said once (no chained second error)
    assert not (tmp_path / "out").exists()
    with pytest.raises(captions_lib.CaptionsError):  # the library says the same
        captions_lib.load_captions(str(side))


def test_prepare_on_a_full_disk_keeps_nothing_half_written_and_the_rerun_resumes_to_the_same_bytes(sav, tmp_path):
    args = [f"--sav={sav}", f"--captions={os.path.join(sav, synthetic.CAPTIONS_FILE)}", "--chunk_size=2"]
    r = _run("ttm_jax.data.prepare", *args, f"--out={tmp_path / 'out'}", file_size_limit=2048)
    _one_error_line(r, "records-00000.array_record: could not be written (file too large", "run the same command")
    left = sorted(os.listdir(tmp_path / "out"))
    assert not [n for n in left if n.endswith(".array_record") or ".tmp." in n], left  # no shard, whole or half
    assert _run("ttm_jax.data.prepare", *args, f"--out={tmp_path / 'out'}").returncode == 0
    assert _run("ttm_jax.data.prepare", *args, f"--out={tmp_path / 'ref'}").returncode == 0
    ref = sorted(os.listdir(tmp_path / "ref"))
    assert sorted(os.listdir(tmp_path / "out")) == ref and any(n.endswith(".array_record") for n in ref)
    for name in ref:
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), name


# --------------------------------------------------------------------------------------------- convert


@pytest.fixture(scope="module")
def diffusers_folder(tmp_path_factory):
    torch = pytest.importorskip("torch")
    from diffusers import WanTransformer3DModel  # noqa: PLC0415 (torch-only test dependency)

    torch.manual_seed(0)
    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                  out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=1,
                                  cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
                                  rope_max_seq_len=32)
    path = str(tmp_path_factory.mktemp("wan") / "transformer")
    model.save_pretrained(path, safe_serialization=True)
    return path


def _copy_without(src: str, dst: str, drop: str) -> None:
    os.makedirs(dst)
    with open(os.path.join(src, "config.json")) as f, open(os.path.join(dst, "config.json"), "w") as g:
        g.write(f.read())
    name = [n for n in os.listdir(src) if n.endswith(".safetensors")][0]
    with open(os.path.join(src, name), "rb") as f:
        raw = f.read()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    data = raw[8 + n:]
    keep = {k: v for k, v in header.items() if k != drop}
    chunks, offset, new = [], 0, {}
    for k, v in keep.items():
        if k == "__metadata__":
            new[k] = v
            continue
        b, e = v["data_offsets"]
        chunks.append(data[b:e])
        new[k] = {**v, "data_offsets": [offset, offset + e - b]}
        offset += e - b
    head = json.dumps(new).encode()
    head += b" " * (-len(head) % 8)
    with open(os.path.join(dst, name), "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head + b"".join(chunks))


def test_convert_a_folder_missing_a_key_is_one_line(diffusers_folder, tmp_path):
    _copy_without(diffusers_folder, str(tmp_path / "src"), "proj_out.weight")
    r = _run("ttm_jax.convert", f"--from=diffusers:{tmp_path / 'src'}", f"--to=orbax:{tmp_path / 'out'}")
    _one_error_line(r, "proj_out.weight")
    assert not (tmp_path / "out").exists()


def test_convert_a_truncated_safetensors_is_one_line(diffusers_folder, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in os.listdir(diffusers_folder):
        data = open(os.path.join(diffusers_folder, name), "rb").read()
        (src / name).write_bytes(data[:len(data) * 2 // 3] if name.endswith(".safetensors") else data)
    r = _run("ttm_jax.convert", f"--from=diffusers:{src}", f"--to=orbax:{tmp_path / 'out'}")
    _one_error_line(r, ".safetensors")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------- in-process pieces


def test_the_rule_folds_a_message_to_one_line_and_exits_2(capsys):
    def main(argv):
        del argv
        raise cli.MissingInput("x --in=/a: no such file\n  give a folder")

    with pytest.raises(SystemExit) as e:
        cli.guarded(main)([])
    assert e.value.code == 2
    assert capsys.readouterr().err == "error: x --in=/a: no such file give a folder\n"

    def bug(argv):
        raise KeyError("a bug")

    with pytest.raises(KeyError):  # not a user error: the traceback stays
        cli.guarded(bug)([])


def test_project_errors_for_bad_input_follow_the_rule():
    from ttm_jax.data import records  # noqa: PLC0415
    from ttm_jax.runtime import checkpoint  # noqa: PLC0415
    from ttm_jax.train import lock  # noqa: PLC0415
    from ttm_jax.weights import rulebook  # noqa: PLC0415
    for error in (config_lib.ConfigError, captions_lib.CaptionsError, records.RecordError, llm.LLMError,
                  checkpoint.NoUsableCheckpoint, lock.WorkdirLocked, rulebook.ConversionError):
        assert issubclass(error, cli.UserError), error
    # and keep their old bases, so callers that catch ValueError / RuntimeError still do
    assert issubclass(config_lib.ConfigError, ValueError) and issubclass(llm.LLMError, RuntimeError)


def test_an_unreachable_server_names_the_settings_of_the_command_that_asked():
    port = _free_port()  # nothing listens there: connection refused
    sample = llm.ChatClient(f"http://127.0.0.1:{port}", retries=0, timeout=5)
    with pytest.raises(llm.LLMError) as e:
        sample.complete([{"role": "user", "content": "hi"}])
    assert "config.sample.llm_timeout" in str(e.value) and "config.sample.llm_url empty" in str(e.value)
    caption = llm.ChatClient(f"http://127.0.0.1:{port}", retries=0, timeout=5,
                             settings={"url": "--vlm_url", "model": "--vlm_model", "api_key": "--api_key",
                                       "timeout": "--timeout", "fallback": ""})
    with pytest.raises(llm.LLMError) as e:
        caption.complete([{"role": "user", "content": "hi"}])
    assert "--timeout" in str(e.value) and "config.sample" not in str(e.value)


def test_training_with_sentencepiece_and_no_tokenizer_path_fails_before_compute(tmp_path):
    r = _run("ttm_jax.main", "--config=configs/stage2.py", f"--workdir={tmp_path / 'w'}",
             "--config.text_encoder.tokenizer=sentencepiece")
    _one_error_line(r, "config.text_encoder.tokenizer_path", "spiece.model")
    assert not (tmp_path / "w").exists()
