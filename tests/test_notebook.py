"""colabs/quickstart.ipynb executes top to bottom (nbclient, a real kernel, CPU) on the tiny trained checkpoints."""

import json
import os
import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

from ttm_jax.data import video_io

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "colabs" / "quickstart.ipynb"


def test_notebook_is_valid_and_colab_ready():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "commit the notebook without outputs"


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    from test_pipeline_e2e import tiny_checkpoints

    s1, s2 = tiny_checkpoints()
    runs = tmp_path_factory.mktemp("runs")
    env = {"TTM_STAGE1_WORKDIR": s1, "TTM_STAGE2_WORKDIR": s2, "TTM_QUICKSTART_RUNS": str(runs),
           "TTM_QUICKSTART_SAMPLE_STEPS": "2", "TTM_LLM_URL": "",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the kernel inherits this process's environment
    try:
        nb = nbformat.read(NOTEBOOK, as_version=4)
        NotebookClient(nb, timeout=600, kernel_name="python3",
                       resources={"metadata": {"path": str(ROOT / "colabs")}}).execute()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return nb, runs


def test_notebook_generates_and_shows_the_video(executed):
    nb, runs = executed
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "stage 1: using the checkpoints" in text and "motion prompt: The " in text
    # the last cell embeds the side-by-side mp4 inline
    html = [o["data"]["text/html"] for o in outputs if o.output_type == "display_data" and "text/html" in o["data"]]
    assert html and "<video" in html[-1] and "base64" in html[-1]
    record = json.loads((runs / "samples" / "quickstart.json").read_text())
    side = video_io.read_frames(record["side_by_side"])
    assert side.shape == (record["settings"]["frames"], record["settings"]["height"],
                          3 * record["settings"]["width"], 3)
    assert record["settings"]["num_steps"] == 2
