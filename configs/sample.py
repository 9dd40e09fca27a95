"""Two-stage generation from trained stage-1 and stage-2 workdirs.

    python -m ttm_jax.main --config=configs/sample.py --workdir=OUT \
        --config.sample.stage1_workdir=RUNS/stage1 --config.sample.stage2_workdir=RUNS/stage2 \
        --config.sample.image=first_frame.png --config.sample.masks=red_square.png,blue_disc.png \
        --config.sample.caption="the red square slides left while the blue disc rises"

or many videos from a JSONL of requests (`--config.sample.requests=requests.jsonl`, one
`{"image", "caption", "masks" | "boxes", "labels"?, "seed"?, "name"?}` per line; bad lines are reported and skipped,
`OUT/samples.jsonl` holds each request's status, a re-run skips the requests already done). The model shapes come
from the configs saved beside the checkpoints; this file holds only the sampling settings. `arg` may be `key=value`
pairs of the `sample` section (`configs/sample.py:num_steps=50,schedule=uniform`), parsed as the stage configs'
argument (`ttm_jax.config.parse_arg`): each value typed as its default, booleans true for 1/true/yes.
"""

import ml_collections

from ttm_jax import config as config_lib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The sampling job's config; `arg`: `key=value` pairs of the `sample` section (`config_lib.parse_arg`)."""
    c = ml_collections.ConfigDict()
    c.job = "sample"
    s = c.sample = ml_collections.ConfigDict()
    # what to generate: one request (image + caption + masks or boxes) or a JSONL of requests
    s.image = ""  # first frame (PNG/JPEG); centre-cropped to the models' aspect ratio (masks too), then resized
    s.caption = ""
    # comma-separated PNGs (one per object, file name = label) | ids PNG | SA-V json[:frame] | COCO RLE json
    s.masks = ""
    s.boxes = ""  # "x0,y0,x1,y1;x0,y0,x1,y1" in image pixels (when no masks)
    s.labels = ""  # comma-separated object labels for boxes, matched to the local prompts
    s.motion_prompt = ""  # optional: skip planning of the motion prompt
    s.local_prompts = ""  # optional: "|"-separated local prompts in mask order (skips planning)
    s.requests = ""  # JSONL of requests; overrides image/caption/masks/boxes
    s.name = "sample"  # output file stem for a single request
    # the trained stages (latest checkpoint of each; model configs read from there)
    s.stage1_workdir = ""
    s.stage2_workdir = ""
    # prompt planning: an OpenAI-compatible server (vLLM, llama.cpp, Ollama); empty: the offline planner
    s.llm_url = ""
    s.llm_model = "default"
    s.llm_timeout = 60.0
    s.llm_retries = 2
    s.llm_api_key = ""
    s.match = "auto"  # local prompts -> masks: auto | label | colour | order
    # first-frame segmentation (the optional torch extra; ttm_jax/clients/segment.py): boxes -> SAM2 masks, and, with
    # neither masks nor boxes, the objects named by the labels / local prompts / caption -> Grounding DINO boxes
    # boxes -> masks: auto (SAM2 when sam2_path is set, else solid rectangles) | sam2 (SAM2 at sam2_path; an error
    # naming sam2_path without it) | rectangles (boxes used as solid masks, which the models never saw in training)
    s.box_masks = "auto"
    s.sam2_path = ""  # transformers Sam2Model folder, e.g. facebook/sam2.1-hiera-large downloaded
    s.detector_path = ""  # transformers GroundingDinoForObjectDetection folder, e.g. IDEA-Research/grounding-dino-base
    s.detector_threshold = 0.3  # a named object whose best box scores below this is not found
    # sampler and guidance
    s.num_steps = 20
    s.schedule = "linear_quadratic"  # linear_quadratic (Movie Gen) | uniform
    s.shift = 1.0  # time shift of the grid (1: none)
    s.image_scale = 1.5  # InstructPix2Pix image guidance
    s.guidance_rescale = 0.0  # CFG rescale towards the conditional prediction's std (0: off; 0.7 with ddim_v)
    s.text_scale = 3.0  # InstructPix2Pix text guidance
    s.seed = 0
    s.ema = True  # the EMA parameters when the training run kept them (else the raw ones)
    s.batch_size = 1  # requests per batch (split over the devices when it divides)
    s.anchor_first_frame = True  # trajectory frame 0 := the given first-frame masks
    s.update(config_lib.parse_arg(arg, s.to_dict(), bare_key=None, where="configs/sample.py"))
    return c
