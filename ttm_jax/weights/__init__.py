"""Foreign weight formats: reading, writing and converting other frameworks' checkpoints into this package's params.

Owns: generic safetensors I/O on numpy (`safetensors_io`: lazy readers, a streamed writer), the declarative,
reversible torch <-> Flax conversion table (`rulebook`), one rulebook per model (`dit`: diffusers
`WanTransformer3DModel` <-> the DiT backbone, and the converted Orbax checkpoint + `ttm_convert.json`; `t5`:
transformers T5-family encoders; `wan_vae`: diffusers `AutoencoderKLWan`, and the Wan autoencoder built from such a
folder), and loading converted folders.

May import only `ttm_jax.config`, `ttm_jax.models`, `ttm_jax.diffusion`, `ttm_jax.runtime` and `ttm_jax.weights`;
the conversion tool (`python -m ttm_jax.convert`, `ttm_jax.convert`) sits on top of it.
"""
