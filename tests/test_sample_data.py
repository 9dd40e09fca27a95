"""Where the tests find the real SA-V sample: `$TTM_SAV_SAMPLE`, else `../shared/data/sav_sample` beside the checkout,
nothing else (no machine path); every test that reads it skips saying which file is missing, where it was looked for
and how to fix it; `.ci/run` refuses to run without it."""

import importlib.util
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# every test that reads the real sample files
SAMPLE_TESTS = (
    "tests/test_sav.py",
    "tests/test_clips.py::test_masks_land_on_their_frames",
    "tests/test_clips.py::test_twelve_fps_clip_starts_on_an_annotation",
    "tests/test_clips.py::test_local_prompts_pick_and_pad_objects",
    "tests/test_video_io.py::test_real_mp4_frame_count_and_size",
    "tests/test_synthetic.py::test_json_has_every_field_with_the_real_types",
    "tests/test_synthetic.py::test_the_real_json_semantics_match_ours",
    "tests/test_sav_bad_input.py::test_the_real_annotation_cut_short_is_a_skip",
)


def _load_copy(tmp_path, monkeypatch, env_value):
    """tests/sample_data.py copied into a checkout `tmp_path/checkout` with no `shared/` beside it, imported with
    `$TTM_SAV_SAMPLE` unset (None) or set."""
    tests = tmp_path / "checkout" / "tests"
    tests.mkdir(parents=True)
    shutil.copy(os.path.join(ROOT, "tests", "sample_data.py"), tests / "sample_data.py")
    if env_value is None:
        monkeypatch.delenv("TTM_SAV_SAMPLE", raising=False)
    else:
        monkeypatch.setenv("TTM_SAV_SAMPLE", env_value)
    spec = importlib.util.spec_from_file_location(f"sample_data_copy_{env_value is None}", tests / "sample_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_sample_is_the_env_var_or_beside_the_checkout_only(tmp_path, monkeypatch):
    beside = str(tmp_path / "shared" / "data" / "sav_sample")
    m = _load_copy(tmp_path, monkeypatch, None)
    assert m.SAV_SAMPLE == beside  # not a fixed machine path, even where one exists
    reason = m.missing_reason("sav_000001_manual.json")
    assert "sav_000001_manual.json" in reason and beside in reason and "TTM_SAV_SAMPLE is not set" in reason
    assert "set TTM_SAV_SAMPLE" in reason
    (tmp_path / "shared" / "data" / "sav_sample").mkdir(parents=True)
    (tmp_path / "shared" / "data" / "sav_sample" / "sav_000001_manual.json").write_text("{}")
    assert m.missing_reason("sav_000001_manual.json") is None
    assert "01_dog.mp4" in m.missing_reason("sav_000001_manual.json", "01_dog.mp4")
    empty = tmp_path / "empty"
    empty.mkdir()
    m = _load_copy(tmp_path / "again", monkeypatch, str(empty))
    assert m.SAV_SAMPLE == str(empty)
    assert f"$TTM_SAV_SAMPLE={empty}" in m.missing_reason("sav_000001_manual.json")


def test_tests_that_read_the_sample_say_why_they_skip(tmp_path):
    empty = tmp_path / "no_sample"
    empty.mkdir()
    report = tmp_path / "report.xml"
    env = {**os.environ, "TTM_SAV_SAMPLE": str(empty)}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}",
                        *SAMPLE_TESTS], capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    cases = ET.parse(report).getroot().iter("testcase")
    skipped = {f"{c.get('classname')}::{c.get('name')}": c.find("skipped") for c in cases}
    assert len(skipped) >= 20  # test_sav.py's tests and the others, parametrized ones included
    for name, skip in skipped.items():
        assert skip is not None, f"{name} ran without the sample"
        message = skip.get("message", "")
        assert "real SA-V sample missing" in message and f"$TTM_SAV_SAMPLE={empty}" in message, (name, message)
        assert ".json" in message or ".mp4" in message, (name, message)


@pytest.mark.parametrize("env_value", [None, "empty"])
def test_ci_refuses_to_run_without_the_sample(tmp_path, env_value):
    checkout = tmp_path / "checkout"
    (checkout / ".ci").mkdir(parents=True)
    shutil.copy(os.path.join(ROOT, ".ci", "run"), checkout / ".ci" / "run")
    env = {k: v for k, v in os.environ.items() if k != "TTM_SAV_SAMPLE"}
    if env_value:
        (tmp_path / env_value).mkdir()
        env["TTM_SAV_SAMPLE"] = str(tmp_path / env_value)
    r = subprocess.run(["bash", str(checkout / ".ci" / "run")], capture_output=True, text=True, timeout=60, env=env,
                       cwd=tmp_path)
    assert r.returncode != 0 and r.stdout == ""
    assert r.stderr.startswith(".ci/run: error: the real SA-V sample is missing: sav_000001_manual.json")
    where = str(tmp_path / env_value) + " ($TTM_SAV_SAMPLE)" if env_value else \
        str(tmp_path / "shared" / "data" / "sav_sample") + " (beside the checkout, ../shared/data/sav_sample)"
    assert where in r.stderr and "set TTM_SAV_SAMPLE" in r.stderr
