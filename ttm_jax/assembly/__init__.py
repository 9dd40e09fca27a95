"""Stage assembly: everything that turns a config into a runnable stage, shared by training, sampling, export and
evaluation.

  registry.py    which modules a stage uses, chosen by name: backbones (with their init inputs), text encoders,
                 autoencoders (frozen weights from user paths), tokenizers, objectives, stage kinds
  objectives.py  the training objective behind one interface: time sampling, noisy input, loss target, model time,
                 sampler time grid and step (rectified flow today)
  modules.py     `Modules` (model, text encoder, autoencoder, tokenizer) built from the registries
  inputs.py      a stage's inputs from a batch: latents, text embeddings, object ids, condition dropout, the noisy
                 model input and its target; the model call given conditions (training samples and inference)
  frozen.py      the frozen text encoder's params (converted weights or random) and the empty prompt's embeddings
  params.py      the trained model's init function and parameter shardings
  trained.py     a trained stage loaded from a workdir (config + params + frozen parts + mesh)

Layer: above `config`, `models`, `diffusion`, `runtime`, `weights`, `data`; below `train`, `inference`, `eval`,
`convert` and the command lines. A new backbone, objective or stage kind is a new registry entry here.
"""
