"""Prompt planning: templates, tolerant answer parsing, the offline planner, prompt-to-mask matching."""

import numpy as np
import pytest

from ttm_jax.data import synthetic
from ttm_jax.inference import prompts as P

TWO = ["the red square slides left", "the blue disc rises"]


def test_templates_are_few_shot_chats_in_the_answer_format():
    msgs = P.local_messages("A cat jumps.", object_names=["cat"])
    assert msgs[0]["role"] == "system" and msgs[-1]["role"] == "user"
    assert msgs[-1]["content"] == "Caption: A cat jumps.\nObjects, in this order: Object 1: cat"
    shots = [m["content"] for m in msgs[1:-1]]
    assert [m["role"] for m in msgs[1:-1]] == ["user", "assistant"] * len(P.LOCAL_EXAMPLES)
    # every few-shot answer is the canonical format and parses back to its prompts
    for (_, want), answer in zip(P.LOCAL_EXAMPLES, shots[1::2], strict=True):
        assert answer.startswith("Answer: [[Object 1: ")
        assert P.parse_local_answer(answer) == want
    motion = P.motion_messages("A dog runs.")
    for (caption, want), answer in zip(P.MOTION_EXAMPLES, [m["content"] for m in motion[2:-1:2]], strict=True):
        assert P.parse_motion_answer(answer) == want
        # the motion prompt keeps no appearance word of the caption
        dropped = set(caption.lower().split()) & P.APPEARANCE_WORDS
        assert not dropped & set(want.lower().rstrip(".").split())


@pytest.mark.parametrize("answer", [
    "Answer: [[Object 1: the red square slides left] [Object 2: the blue disc rises]]",
    "answer:[[object 1:the red square slides left][object 2:the blue disc rises]]",
    "  Answer:  [[Object 1:   the red square   slides left]\n\n   [Object 2: the blue disc rises]]  \n",
    "[[Object 1: the red square slides left] [Object 2: the blue disc rises]]",  # no Answer:
    "**Answer:** [[Object 1: the red square slides left] [Object 2: the blue disc rises]]",  # markdown
    "```\nAnswer: [[Object 1: the red square slides left]\n[Object 2: the blue disc rises]]\n```",  # code fence
    "Answer: [Object 1: the red square slides left] [Object 2: the blue disc rises]",  # single brackets
    "Answer: [Object 1: the red square slides left, Object 2: the blue disc rises]",  # one bracket, commas
    "Here are the prompts.\n- Object 1) the red square slides left\n- Object 2) the blue disc rises",  # bullets
    "Answer: [[Object #1 - \"the red square slides left\"] [Object #2 - \"the blue disc rises\"]]",  # quoted, '#', '-'
    "Answer: [[Object 2: the blue disc rises] [Object 1: the red square slides left]]",  # out of order
    "Answer:\n1. the red square slides left\n2. the blue disc rises",  # plain numbering
    "Answer: [[the red square slides left] [the blue disc rises]]",  # no numbering at all
    "Answer: [[Obj. 1: the red square slides left] [Obj. 2: the blue disc rises]]",
    "Thinking: two objects. Answer: [[Object 1: the red square slides left] [Object 2: the blue disc rises]]",
])
def test_parse_local_answer_variants(answer):
    assert P.parse_local_answer(answer, num_objects=2) == TWO


@pytest.mark.parametrize("answer,match", [
    ("I cannot help with that.", "no local prompts"),
    ("Answer: the square moves", "1 local prompts for 3 objects"),
    ("", "no local prompts"),
    ("Answer: [[Object 1: a] [Object 1: b]]", r"numbered \[1, 1\]"),
    ("Answer: [[Object 1: a] [Object 3: b]]", r"numbered \[1, 3\]"),
])
def test_parse_local_answer_errors_quote_the_answer(answer, match):
    with pytest.raises(P.PromptParseError, match=match) as e:
        P.parse_local_answer(answer, num_objects=3)
    assert repr(answer.strip())[:40] in str(e.value)


def test_parse_local_answer_count_mismatch():
    with pytest.raises(P.PromptParseError, match="2 local prompts for 3 objects"):
        P.parse_local_answer("Answer: [[Object 1: a] [Object 2: b]]", num_objects=3)


@pytest.mark.parametrize("answer", ["Answer: The dog runs left.", "**Answer:** \"The dog runs left.\"",
                                    "The dog runs left.", "```\nAnswer: The dog runs left.\n```\n"])
def test_parse_motion_answer(answer):
    assert P.parse_motion_answer(answer) == "The dog runs left."
    with pytest.raises(P.PromptParseError, match="no motion prompt"):
        P.parse_motion_answer("**Answer:**   \n")


def test_offline_planner_reproduces_the_synthetic_prompts():
    """On captions of the synthetic SA-V generator (1-4 objects, modifiers, background clause) the planner gives back
    exactly the motion prompt and local prompts the generator wrote from the scene parameters."""
    for i in range(120):
        entry = synthetic.caption_entry("v", synthetic.sample_scene(7, i, height=64, width=64, frames=9))
        plan = P.plan_offline(entry["caption"])
        assert plan.motion_prompt == entry["motion_prompt"], entry["caption"]
        assert plan.local_prompts == list(entry["local_prompts"].values()), entry["caption"]
        assert plan.source == "offline"


def test_offline_planner_on_free_captions():
    plan = P.plan_offline("the red square slides left while the blue disc rises")
    assert plan.local_prompts == TWO and plan.objects == ["red square", "blue disc"]
    assert plan.motion_prompt == "The red square slides left while the blue disc rises."
    plan = P.plan_offline("A fluffy dog runs to the left on a sunny meadow, and a shiny ball bounces")
    assert plan.local_prompts == ["the fluffy dog runs to the left", "the shiny ball bounces"]
    assert plan.motion_prompt == "The dog runs to the left while the ball bounces."
    with pytest.raises(P.PlanningError, match="no motion verb in 'A beautiful sunset'.*llm_url"):
        P.plan_offline("A beautiful sunset")


def _plan(objects):
    return P.Plan("c", "m", [f"the {o} moves" for o in objects], list(objects), "given")


def test_match_by_label_finds_the_permutation():
    plan = _plan(["red square", "blue disc", "green triangle"])
    m = P.match_prompts_to_masks(plan, 3, labels=["green_triangle", "red square", "disc"])
    assert m.by == "label" and m.prompt_for_mask == [2, 0, 1]
    assert m.local_prompts(plan) == ["the green triangle moves", "the red square moves", "the blue disc moves"]
    rows = m.to_json(plan, ["green_triangle", "red square", "disc"])
    assert rows[0] == {"object_id": 1, "mask_label": "green_triangle", "local_prompt": "the green triangle moves",
                       "prompt_index": 2, "matched_by": "label"}


def test_match_by_colour_reads_the_image():
    rng = np.random.default_rng(0)
    image = rng.integers(90, 120, (32, 32, 3)).astype(np.uint8)  # grey-ish background
    masks = np.zeros((32, 32, 3), bool)
    colours = [(40, 80, 220), (215, 40, 40), (40, 175, 60)]  # blue, red, green blobs
    for k, (y, c) in enumerate(zip((2, 12, 22), colours, strict=True)):
        masks[y:y + 8, 4:12, k] = True
        image[y:y + 8, 4:12] = np.clip(np.array(c) + rng.integers(-15, 15, (8, 8, 3)), 0, 255)
    plan = _plan(["red square", "green disc", "blue diamond"])
    m = P.match_prompts_to_masks(plan, 3, image=image, masks=masks)
    assert m.by == "colour" and m.prompt_for_mask == [2, 0, 1]


def test_match_by_order_and_counts():
    plan = _plan(["dog", "cat"])
    m = P.match_prompts_to_masks(plan, 3)
    assert m.by == "order" and m.prompt_for_mask == [0, 1, -1]
    assert m.local_prompts(plan) == ["the dog moves", "the cat moves", ""]  # an extra mask: empty local prompt
    with pytest.raises(ValueError, match="3 local prompts.*only 2 first-frame mask.*config.sample.masks"):
        P.match_prompts_to_masks(_plan(["a", "b", "c"]), 2)


def test_object_phrase():
    assert P.object_phrase("the left dog runs to the left") == "left dog"
    assert P.object_phrase("left dog: the dog runs to the left") == "left dog"
