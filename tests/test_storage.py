"""The one atomic writer and JSON reader (`ttm_jax/storage.py`): whole files, the JSON layouts callers ask for, a
refused write that keeps nothing, and `read_json`'s two behaviours for an absent or cut-short file."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys

import pytest

from ttm_jax import storage


def test_bytes_and_json_are_written_whole_with_the_asked_layout(tmp_path):
    path = tmp_path / "sub" / "a.bin"  # the parent folder is made
    storage.write_bytes_atomic(path, b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"
    storage.write_bytes_atomic(path, b"new")  # replaced, not appended
    assert path.read_bytes() == b"new"
    obj = {"b": 1, "a": [1, 2]}
    storage.write_json_atomic(tmp_path / "s.json", obj)
    assert (tmp_path / "s.json").read_text() == json.dumps(obj, indent=1, sort_keys=True)
    storage.write_json_atomic(tmp_path / "o.json", obj, indent=None, sort_keys=False)
    assert (tmp_path / "o.json").read_text() == '{"b": 1, "a": [1, 2]}'
    assert sorted(os.listdir(tmp_path)) == ["o.json", "s.json", "sub"]  # no temporary file left


def test_read_json_raises_or_gives_missing_for_an_absent_or_cut_short_file(tmp_path):
    good, cut = tmp_path / "good.json", tmp_path / "cut.json"
    good.write_text('{"x": 1}')
    cut.write_text('{"x": ')
    assert storage.read_json(good) == storage.read_json(good, missing=None) == {"x": 1}
    with pytest.raises(FileNotFoundError):
        storage.read_json(tmp_path / "absent.json")
    with pytest.raises(json.JSONDecodeError):
        storage.read_json(cut)
    assert storage.read_json(tmp_path / "absent.json", missing=None) is None
    assert storage.read_json(cut, missing={}) == {}


def test_a_write_the_storage_refuses_keeps_nothing_and_says_so_in_one_error(tmp_path):
    """A real EFBIG (RLIMIT_FSIZE below the file's size, SIGXFSZ ignored as a shell's `ulimit -f` run would not):
    `cli.StorageRefused` names the file and the cause, and neither the file nor its temporary name is left."""
    target = tmp_path / "big.json"
    code = ("import signal, sys\nsignal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
            "from ttm_jax import cli, storage\n"
            "try:\n    storage.write_json_atomic(sys.argv[1], {'x': 'y' * 8192})\n"
            "except cli.StorageRefused as e:\n    print(e)\n")
    r = subprocess.run([sys.executable, "-c", code, str(target)], capture_output=True, text=True, check=True,
                       preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (2048, 2048)))
    assert r.stdout.startswith(f"{target}: could not be written (file too large"), r.stdout + r.stderr
    assert "run the same command again" in r.stdout
    assert os.listdir(tmp_path) == []


def test_temporary_names_are_this_process_and_host_and_remote_paths_are_urls():
    name = os.path.basename(storage.tmp_name("/x/records-00000.array_record"))
    assert name.startswith("records-00000.array_record" + storage.TMP_MARK) and name.endswith(f"-{os.getpid()}")
    assert not storage.is_stale_tmp(name)  # this process is alive
    assert storage.is_remote("gs://bucket/a.json") and not storage.is_remote("/tmp/a.json")


def test_stale_temporary_files_of_dead_processes_go_and_live_ones_stay(tmp_path):
    dead_pid = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                              check=True).stdout.strip()
    live = os.path.basename(storage.tmp_name(str(tmp_path / "a.json")))
    dead = live.rpartition("-")[0] + "-" + dead_pid
    (tmp_path / "sub").mkdir()
    for name in (live, dead, f"sub/{dead}", "a.json"):
        (tmp_path / name).write_text("x")
    storage.remove_stale_tmp(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == sorted([live, "a.json", "sub"])
    assert os.listdir(tmp_path / "sub") == [dead]  # not below the folder unless asked
    storage.remove_stale_tmp(str(tmp_path), recursive=True)
    assert os.listdir(tmp_path / "sub") == []
