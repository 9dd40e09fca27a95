"""The conversion tool: `python -m ttm_jax.convert` (`__main__.py`, the command line) and the TTM export / import of
trained stage models to and from PyTorch folders (`export.py`). The conversions themselves (safetensors I/O,
rulebooks per model) live in `ttm_jax.weights`; nothing in the package imports `ttm_jax.convert`."""
