"""Test setup: 8 simulated CPU devices, absl flags parsed (Grain workers read them)."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()

# The heaviest test files, in seconds on one core (`pytest --durations=0`, 2026-12-07). pyproject's addopts run the
# suite with `--dist loadfile --no-loadscope-reorder`: pytest-xdist hands whole files to its workers in collection
# order, and this order puts the longest first (the usual longest-first scheduling), so that the two workers end
# together instead of one of them drawing a heavy file last. Files not listed follow in their usual order. The three
# files that share the tiny trained checkpoints (`test_pipeline_e2e.tiny_checkpoints`: eval_run, pipeline_e2e,
# notebook) are far enough apart that the later two find them trained instead of waiting on the lock.
_FILE_SECONDS = {
    "test_eval_run.py": 101, "test_unet_stage.py": 79, "test_sparse_attention.py": 74, "test_command_lines.py": 69,
    "test_context_train.py": 64, "test_train_sharding.py": 56, "test_fvd.py": 54, "test_gcs.py": 51,
    "test_context_sparse.py": 44, "test_assembly.py": 40, "test_pipeline_e2e.py": 37, "test_unet.py": 34,
    "test_notebook.py": 33, "test_cpu_perf_settings.py": 31, "test_ti2v.py": 28, "test_context_parallel.py": 27,
    "test_describe.py": 26, "test_train_robustness.py": 24, "test_train_checkpoint.py": 20, "test_dit.py": 20,
    "test_attention.py": 19, "test_torch_export.py": 19, "test_convert_cli.py": 18, "test_wan_vae.py": 17,
}


def pytest_collection_modifyitems(items):
    """The longest files first (`_FILE_SECONDS`); a stable sort keeps each file's tests in their order."""
    rank = {name: i for i, name in enumerate(sorted(_FILE_SECONDS, key=lambda n: -_FILE_SECONDS[n]))}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
