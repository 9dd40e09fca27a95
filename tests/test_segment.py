"""First-frame segmentation (`ttm_jax.clients.segment` and its hook in `requests.load_masks`) with tiny random
SAM2 and Grounding DINO models built here from transformers configs and saved with `save_pretrained`.

Random weights cannot pin mask quality; these tests pin the wiring: what the models are fed (pixels and boxes in the
model's coordinates, the names' tokens), what comes back (shapes, orientation, box corners in image pixels, mask k
for box k), the cropping of each mask to its box, the overlay file, and the errors without weights.
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
import tiny_segmenters as tiny
import torch
from PIL import Image
from transformers import Sam2Model

from ttm_jax.clients import segment
from ttm_jax.inference import requests as requests_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
S = 64  # SAM2 input side
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)  # not ImageNet's: the folder's values must be the ones used
H, W = 48, 80  # a non-square image: x and y scale differently
BOXES = np.array([[4.0, 6.0, 30.0, 40.0], [40.0, 8.0, 76.0, 44.0]])
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "?", "a", "the", "red", "blue", "square", "disc", "green",
         "triangle", "dog", "runs"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Torch on one thread: on a shared 2-core machine its default thread pool is many times slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def sam2_path(tmp_path_factory):
    return tiny.save_sam2(str(tmp_path_factory.mktemp("sam2")), size=S, mean=MEAN, std=STD)


@pytest.fixture(scope="module")
def detector_path(tmp_path_factory):
    return tiny.save_grounding_dino(str(tmp_path_factory.mktemp("grounding_dino")), WORDS[7:])


@pytest.fixture(scope="module")
def image():
    return np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def sam2(sam2_path):
    return segment.Sam2(sam2_path)


@pytest.fixture(scope="module")
def detector(detector_path):
    return segment.GroundingDino(detector_path)


# ------------------------------------------------------------------------------------------------------ SAM2


def test_sam2_is_fed_the_image_and_boxes_in_its_own_coordinates(sam2, sam2_path, image):
    """Pixels: bilinear resize to S x S, /255, the folder's mean and std; boxes: x * S/W, y * S/H; the logits are
    the model's own on exactly those inputs, one per box."""
    want = (np.asarray(Image.fromarray(image).resize((S, S), Image.BILINEAR), np.float32) / 255 - MEAN) / STD
    np.testing.assert_allclose(sam2.pixel_values(image), want.transpose(2, 0, 1), rtol=1e-5, atol=1e-5)
    scaled = sam2.scale_boxes(BOXES, (H, W))
    np.testing.assert_allclose(scaled, [[4 * S / W, 6 * S / H, 30 * S / W, 40 * S / H],
                                        [40 * S / W, 8 * S / H, 76 * S / W, 44 * S / H]], rtol=1e-6)
    model = Sam2Model.from_pretrained(sam2_path).eval()
    with torch.no_grad():
        out = model(pixel_values=torch.tensor(want.transpose(2, 0, 1))[None], input_boxes=torch.tensor(scaled)[None],
                    multimask_output=False)
    logits = sam2.logits(image, BOXES)
    assert logits.shape == (2, S // 4, S // 4)
    np.testing.assert_allclose(logits, out.pred_masks[0, :, 0].numpy(), rtol=1e-4, atol=1e-4)
    # mask k belongs to box k: the boxes in the other order give the logits in the other order
    np.testing.assert_allclose(sam2.logits(image, BOXES[::-1]), logits[::-1], rtol=1e-4, atol=1e-4)


def test_sam2_masks_are_at_the_image_size_and_orientation(sam2, image):
    logits = sam2.logits(image, BOXES)
    masks = sam2.masks(image, BOXES)
    assert masks.shape == (H, W, 2) and masks.dtype == bool
    # the full-size mask sampled at the low-resolution pixel centres agrees with the logits' sign there
    ys = ((np.arange(S // 4) + 0.5) * H / (S // 4)).astype(int)
    xs = ((np.arange(S // 4) + 0.5) * W / (S // 4)).astype(int)
    agree = (masks[ys][:, xs].transpose(2, 0, 1) == (logits > 0)).mean()
    assert agree > 0.9, agree


def test_masks_are_cropped_to_their_boxes(sam2_path, image):
    seg = segment.Segmenter(sam2_path)
    raw = seg.sam2.masks(image, BOXES)
    masks, rectangles = seg.masks_from_boxes(image, BOXES)
    inside = segment.box_masks(BOXES, (H, W))
    for k in range(2):
        if k in rectangles:
            np.testing.assert_array_equal(masks[..., k], inside[..., k])
        else:
            np.testing.assert_array_equal(masks[..., k], raw[..., k] & inside[..., k])
    assert not (masks & ~inside).any()
    # an empty mask becomes its rectangle, and is reported
    cropped, empty = segment.crop_to_boxes(np.zeros((H, W, 2), bool), BOXES)
    assert empty == [0, 1] and (cropped == inside).all()
    assert inside[6:40, 4:30, 0].all() and inside[..., 0].sum() == 34 * 26


# ------------------------------------------------------------------------------------------------ Grounding DINO


def test_detector_prompt_and_token_spans(detector):
    text, spans = segment.detector_prompt(["Red square", "blue  disc."])
    assert text == "red square. blue disc." and [text[a:b] for a, b in spans] == ["red square", "blue disc"]
    ids, positions = detector.token_spans(text, spans)
    tok = detector.processor.tokenizer
    assert [tok.convert_ids_to_tokens([ids[p] for p in pos]) for pos in positions] == [["red", "square"],
                                                                                      ["blue", "disc"]]


def test_corners_and_assignment():
    np.testing.assert_allclose(segment.corners(np.array([[0.5, 0.25, 0.2, 0.1]]), (60, 100)), [[40, 12, 60, 18]])
    np.testing.assert_allclose(segment.corners(np.array([[0.05, 0.5, 0.2, 2.0]]), (60, 100)), [[0, 0, 15, 60]])
    # the best pair first, then the best query left for the other name
    assert segment.assign(np.array([[0.9, 0.8, 0.1], [0.95, 0.2, 0.3]])) == [1, 0]


def test_detections_are_the_models_best_queries_in_image_pixels(detector):
    """A reference computed here from the raw model: each name's score per query is the largest sigmoid over its
    tokens; boxes (cx, cy, w, h) relative -> corners in pixels, x by W and y by H."""
    img = np.random.default_rng(3).integers(0, 256, (60, 100, 3), dtype=np.uint8)
    names = ["red square", "blue disc"]
    dets = detector.detect(img, names)
    text = "red square. blue disc."
    inputs = detector.processor(images=Image.fromarray(img), text=text, return_tensors="pt")
    with torch.no_grad():
        out = detector.model(**inputs)
    probs = out.logits[0].sigmoid().numpy()
    tokens = detector.processor.tokenizer.convert_ids_to_tokens(inputs["input_ids"][0])
    assert tokens == ["[CLS]", "red", "square", ".", "blue", "disc", ".", "[SEP]"]
    scores = np.stack([probs[:, [1, 2]].max(1), probs[:, [4, 5]].max(1)])
    cx, cy, w, h = out.pred_boxes[0].numpy().T
    boxes = np.clip(np.stack([(cx - w / 2) * 100, (cy - h / 2) * 60, (cx + w / 2) * 100, (cy + h / 2) * 60], 1), 0,
                    [100, 60, 100, 60])
    first = int(np.argmax(scores.max(1)))  # the name with the best pair picks first
    q_first = int(np.argmax(scores[first]))
    rest = scores[1 - first].copy()
    rest[q_first] = -1
    queries = {first: q_first, 1 - first: int(np.argmax(rest))}
    assert [d.name for d in dets] == names
    for i, d in enumerate(dets):
        np.testing.assert_allclose(d.box, boxes[queries[i]], rtol=1e-4, atol=1e-3)
        assert d.score == pytest.approx(float(scores[i, queries[i]]), abs=1e-5)
        x0, y0, x1, y1 = d.box
        assert 0 <= x0 <= x1 <= 100 and 0 <= y0 <= y1 <= 60


# ------------------------------------------------------------------------------------------- the requests hook


def _request(tmp_path, **kw):
    path = tmp_path / "frame.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8)).save(path)
    return requests_lib.Request(image=str(path), caption="the red square slides left while the blue disc rises",
                                name="clip", **kw)


def test_boxes_become_sam2_masks_with_an_overlay(sam2_path, tmp_path):
    req = _request(tmp_path, boxes=BOXES.tolist(), labels=["red square", "blue disc"])
    seg = segment.Segmenter(sam2_path, overlay_dir=str(tmp_path / "out"))
    inputs = requests_lib.load_inputs(req, 24, 40, 4, segmenter=seg)  # the models' frame: 2:1 downscale, same aspect
    image = np.asarray(Image.open(req.image))
    full, _ = seg.masks_from_boxes(image, BOXES)
    np.testing.assert_array_equal(inputs.masks, full[1::2, 1::2])  # nearest neighbour at the pixel centres
    assert inputs.labels == ["red square", "blue disc"]
    overlay = str(tmp_path / "out" / "clip_masks.png")
    assert inputs.mask_source.startswith(f"sam2 {sam2_path} masks of boxes [[4.0, 6.0, 30.0, 40.0], ")
    assert inputs.mask_source.endswith(f"; overlay {overlay}")
    drawn = np.asarray(Image.open(overlay))
    assert drawn.shape == (H, W, 3)
    np.testing.assert_array_equal(drawn, segment.overlay(image, full, BOXES))
    changed = (drawn != image).any(-1)
    assert changed[full.any(-1)].mean() > 0.9  # the masks are tinted
    outside = ~segment.box_masks(BOXES, (H, W)).any(-1)
    assert changed[outside].mean() < 0.1  # outside every box only the number labels may land
    # without a segmenter, boxes are the solid rectangles they always were
    plain = requests_lib.load_inputs(req, 24, 40, 4)
    assert plain.mask_source == "boxes" and plain.masks[3:20, 2:15, 0].all()


def test_names_are_found_with_grounding_dino_then_segmented(sam2_path, detector_path, tmp_path):
    seg = segment.Segmenter(sam2_path, detector_path, threshold=0.0, overlay_dir=str(tmp_path))
    req = _request(tmp_path)  # no masks, no boxes, no labels: the names come from the caption's clauses
    assert requests_lib.object_names(req) == ["red square", "blue disc"]
    inputs = requests_lib.load_inputs(req, H, W, 4, segmenter=seg)
    image = np.asarray(Image.open(req.image))
    dets = seg.boxes_from_names(image, ["red square", "blue disc"])
    boxes = np.asarray([d.box for d in dets])
    assert inputs.labels == ["red square", "blue disc"] and inputs.masks.shape == (H, W, 2)
    assert not (inputs.masks & ~segment.box_masks(boxes, (H, W))).any()
    assert "grounding dino" in inputs.mask_source and "'red square'" in inputs.mask_source
    assert os.path.isfile(tmp_path / "clip_masks.png")
    # names from local prompts, when given
    given = _request(tmp_path, local_prompts=["the green triangle runs", "the dog runs"])
    assert requests_lib.object_names(given) == ["green triangle", "dog"]
    # nothing scores above the threshold: the request names what was not found and the fixes
    strict = segment.Segmenter(sam2_path, detector_path, threshold=1.01)
    with pytest.raises(requests_lib.RequestError, match=r"found no 'red square' \(best score \d\.\d\d\), 'blue disc'"
                                                        r".*detector_threshold=1.01; give boxes or masks"):
        requests_lib.load_inputs(req, H, W, 4, segmenter=strict)


def test_without_weights_the_error_names_the_path_to_set(tmp_path):
    req = _request(tmp_path, boxes=BOXES.tolist())
    with pytest.raises(segment.SegmentError, match=r"^config\.sample\.sam2_path: empty, but boxes are segmented with "
                                                   r"SAM2.*huggingface-cli download"):
        requests_lib.load_inputs(req, H, W, 4, segmenter=segment.Segmenter())
    with pytest.raises(segment.SegmentError, match=r"config\.sample\.sam2_path: '/nonexistent' is not a transformers"):
        requests_lib.load_inputs(req, H, W, 4, segmenter=segment.Segmenter("/nonexistent"))
    bare = _request(tmp_path)
    with pytest.raises(segment.SegmentError, match=r"^config\.sample\.detector_path: empty"):
        segment.Segmenter("", "").detector  # noqa: B018 - the property loads the model
    with pytest.raises(requests_lib.RequestError, match=r"neither masks nor boxes.*config\.sample\.detector_path"):
        requests_lib.load_inputs(bare, H, W, 4, segmenter=segment.Segmenter())
    # rectangles: no SAM2 needed
    rect = requests_lib.load_inputs(req, H, W, 4, segmenter=segment.Segmenter(box_masks="rectangles"))
    assert "as rectangles (config.sample.box_masks=rectangles)" in rect.mask_source
    np.testing.assert_array_equal(rect.masks, segment.box_masks(BOXES, (H, W)))


def test_sample_config_fields():
    spec = importlib.util.spec_from_file_location("sample_config", os.path.join(ROOT, "configs", "sample.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config("sam2_path=/w/sam2,detector_threshold=0.5")
    assert (c.sample.box_masks, c.sample.sam2_path, c.sample.detector_path, c.sample.detector_threshold) == (
        "auto", "/w/sam2", "", 0.5)
    seg = segment.from_config(c.sample, overlay_dir="/out")
    assert (seg.sam2_path, seg.threshold, seg.overlay_dir, seg.box_masks) == ("/w/sam2", 0.5, "/out", "sam2")
    c.sample.box_masks = "rectangles"
    assert segment.from_config(c.sample) is None
    c.sample.box_masks, c.sample.sam2_path = "auto", ""  # auto without SAM2 weights: the boxes stay rectangles
    assert segment.from_config(c.sample) is None
    c.sample.box_masks = "sam2"  # asked for SAM2 without weights: the error names the path (when a box is read)
    assert segment.from_config(c.sample).box_masks == "sam2"
    c.sample.box_masks = "polygons"
    with pytest.raises(segment.SegmentError, match=r"config\.sample\.box_masks: 'polygons'"):
        segment.from_config(c.sample)
