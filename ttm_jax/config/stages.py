"""What a stage is (`config.stage` -> `StageKind`): the one table the config, the stage's inputs, FLOP accounting and
generation read, instead of each branching on the stage number.

A new stage kind is one `STAGES` entry here (its conditions, defaults, what it encodes) and one
`STAGE_KINDS.register(...)` in `assembly/inputs.py` (how it turns a batch into the model's input).
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Mapping
from typing import Any


@dataclasses.dataclass(frozen=True)
class StageKind:
    """One stage's fixed facts.

    stage: its `config.stage` number.
    description: what it generates from what (the `validate` message lists them).
    conditions: condition latents its model input carries besides the noisy one (`geometry.in_channels`):
      E(x0) and E(s0) or E(trajectory) for stages 1 and 2, E(x0) alone for TI2V.
    model_defaults: `config.model` values the stage sets over its variant's row (`variants.build`); a
      `_STAGE_ROWS[(stage, variant)]` entry's own `model` values win over them.
    clips_encoded: whole clips the autoencoder encodes per training example without cached latents (stage 2: video
      and trajectory; stage 1: the trajectory; stage 0: the video), for FLOP accounting (`describe`).
    first_frame_encoded: whether it also encodes the first frame alone (stage 1: E(x0) apart from the trajectory).
    local_prompt_flops: whether FLOP accounting counts the K+1 local prompts' text encoding when the model has added
      layers (`describe.frozen_encoder_flops`; stage 1 is counted without them, as the paper's stage 1).
    follows_stage1: whether generation runs a stage-1 model first and conditions on its trajectory (stage 2); the
      TI2V baseline sits in the stage-2 slot of a pipeline with no stage 1 (`inference/pipeline.py`).
    """

    stage: int
    description: str
    conditions: int
    model_defaults: Mapping[str, Any]
    clips_encoded: int
    first_frame_encoded: bool
    local_prompt_flops: bool
    follows_stage1: bool

    def __post_init__(self) -> None:
        object.__setattr__(self, "model_defaults", types.MappingProxyType(dict(self.model_defaults)))


# config.stage -> its kind, in the order the stages are listed to a user
STAGES: dict[int, StageKind] = {
    1: StageKind(
        1, "image-to-motion: first frame + first-frame masks + motion prompt -> trajectory", conditions=2,
        # the paper's stage 1 reads the motion prompt only; `model.ttm_layers > 0` adds layers whose masked
        # cross-attention gives each object's first-frame tokens its local prompt (tokens of later frames: slot 0),
        # and whose self-attention is unmasked (the objects' later places are what stage 1 generates) (a stage-1 row
        # may add them: the tiny stage 1 has them in its first block, `_STAGE_ROWS`). `stage1_later_ids`: which local
        # prompt the added layers give the tokens of latent frames 1+: "background" (slot 0) or "start" (the first
        # frame's ids in every frame: each object's starting place reads its local prompt, as s0 sits in every latent
        # frame with condition_frames="all"). `condition_frames="all"`: E(x0), E(s0) in every latent frame, since
        # frames 1+ of a trajectory have no other local condition (ttm_jax/models/conditioning.py)
        model_defaults={"ttm_layers": 0, "ttm_masked_self": False, "stage1_later_ids": "background",
                        "condition_frames": "all"},
        clips_encoded=1, first_frame_encoded=True, local_prompt_flops=False, follows_stage1=False),
    2: StageKind(
        2, "motion-to-video: first frame + trajectory + caption + local prompts -> video", conditions=2,
        model_defaults={}, clips_encoded=2, first_frame_encoded=False, local_prompt_flops=True, follows_stage1=True),
    0: StageKind(
        0, "single-stage TI2V baseline: first frame + caption (+ local prompts, unmasked) -> video, no trajectory",
        conditions=1,
        # stage 2's added layers, unmasked (there are no object ids without a trajectory)
        model_defaults={"ttm_masked": False},
        clips_encoded=1, first_frame_encoded=False, local_prompt_flops=True, follows_stage1=False),
}
