"""Prompt planning: a caption -> a motion prompt + one local prompt per object (the text side only).

TTM (section 3, appendix) turns the caption `c` into
- a *motion prompt* `c_motion`: all the motion in `c`, no appearance or background (stage 1's text condition), and
- *local prompts* `c_local[i]`, one per moving object, each describing that object and its motion only (the keys and
  values of stage 2's masked cross-attention),
with an LLM and two few-shot templates. This module holds
- the two templates (`motion_messages`, `local_messages`, OpenAI-style chat messages),
- tolerant parsers of the answers (`parse_motion_answer`, `parse_local_answer`), which accept the usual ways LLMs
  stray from the format and raise `PromptParseError` quoting the answer otherwise,
- `plan_with_llm` (the two requests, one re-ask on a malformed answer; `complete(messages) -> text` is any chat
  client) and `plan_offline`, a rule-based planner for simple captions (one clause per object: "the red square slides
  left while the blue disc rises").

It sits in the data layer because two users need it: captioning SA-V for training (`ttm_jax.data.caption`) and
planning a request at generation (`ttm_jax.inference.prompts`, which re-exports these names and adds the matching of
local prompts to first-frame masks).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence

from ttm_jax import cli

# ------------------------------------------------------------------------------------------------------ templates

MOTION_SYSTEM = (
    "You rewrite video captions into motion prompts. A motion prompt keeps every movement in the caption and which "
    "object makes it, and drops everything else: no appearance (texture, material, pattern), no background, no scene, "
    "no camera description. Name each object with as few words as identify it. Answer with one line: `Answer: <motion "
    "prompt>`."
)

MOTION_EXAMPLES = (
    ("A fluffy brown dog runs to the left across a sunny green meadow.",
     "The dog runs to the left."),
    ("A red striped square slides left while a blue dotted disc rises, in front of a grey checkered background.",
     "The red square slides left while the blue disc rises."),
    ("Two children in yellow raincoats jump into a puddle on a rainy street while a black cat walks away.",
     "Two children jump into a puddle while the cat walks away."),
    ("An old wooden sailboat with white sails drifts slowly to the right on a calm turquoise sea at sunset.",
     "The sailboat drifts slowly to the right."),
)

LOCAL_SYSTEM = (
    "You split video captions into local prompts, one per moving object. Each local prompt names one object and "
    "describes that object and its motion only, as a short sentence starting with `the`; it never mentions the other "
    "objects or the background. List the objects in the order the caption mentions them. Answer with exactly one "
    "line: `Answer: [[Object 1: <local prompt>] [Object 2: <local prompt>] ...]`."
)

LOCAL_EXAMPLES = (
    ("A fluffy brown dog runs to the left across a sunny green meadow.",
     ["the fluffy brown dog runs to the left"]),
    ("A red striped square slides left while a blue dotted disc rises, in front of a grey checkered background.",
     ["the red striped square slides left", "the blue dotted disc rises"]),
    ("Two dogs play on the beach: the dog on the left runs to the right and the dog on the right jumps.",
     ["the dog on the left runs to the right", "the dog on the right jumps"]),
    ("A man in a red jacket throws a ball to a small girl, who catches it, in a park.",
     ["the man in a red jacket throws a ball", "the small girl catches the ball"]),
)


def format_local_answer(prompts: Sequence[str]) -> str:
    """The canonical answer line: `Answer: [[Object 1: ...] [Object 2: ...]]`."""
    return "Answer: [" + " ".join(f"[Object {i + 1}: {p}]" for i, p in enumerate(prompts)) + "]"


def motion_messages(caption: str) -> list[dict[str, str]]:
    """Chat messages asking for the motion prompt of `caption` (system, few-shot pairs, the request)."""
    msgs = [{"role": "system", "content": MOTION_SYSTEM}]
    for cap, ans in MOTION_EXAMPLES:
        msgs += [{"role": "user", "content": f"Caption: {cap}"}, {"role": "assistant", "content": f"Answer: {ans}"}]
    msgs.append({"role": "user", "content": f"Caption: {caption.strip()}"})
    return msgs


def local_messages(caption: str, num_objects: int | None = None,
                   object_names: Sequence[str] | None = None) -> list[dict[str, str]]:
    """Chat messages asking for the local prompts of `caption`; `num_objects` / `object_names` (the first-frame
    masks' labels, in mask order) are stated in the request when known, so the answer lines up with the masks."""
    msgs = [{"role": "system", "content": LOCAL_SYSTEM}]
    for cap, ans in LOCAL_EXAMPLES:
        msgs += [{"role": "user", "content": f"Caption: {cap}"},
                 {"role": "assistant", "content": format_local_answer(ans)}]
    request = f"Caption: {caption.strip()}"
    if object_names:
        request += "\nObjects, in this order: " + "; ".join(f"Object {i + 1}: {n}" for i, n in enumerate(object_names))
    elif num_objects:
        request += f"\nNumber of moving objects: {num_objects}"
    msgs.append({"role": "user", "content": request})
    return msgs


# -------------------------------------------------------------------------------------------------------- parsers


class PromptParseError(cli.UserError, ValueError):
    """An LLM answer that no tolerant reading can turn into prompts; the message quotes it."""


def _quote(text: str, limit: int = 300) -> str:
    text = text.strip()
    return repr(text if len(text) <= limit else text[:limit] + " ...")


_FENCE = re.compile(r"```[a-zA-Z]*")
_ANSWER = re.compile(r"answer\s*:", re.IGNORECASE)


def _clean(text: str) -> str:
    """Drop code fences and markdown emphasis; keep what follows the last `Answer:` when there is one."""
    text = _FENCE.sub("\n", text).replace("**", "").replace("__", "").replace("`", "")
    parts = _ANSWER.split(text)
    return parts[-1].strip()


def _strip_item(item: str) -> str:
    item = item.strip().strip("[]").strip()
    item = re.sub(r"^[\s\-*\u2022]+|[\s\-*\u2022]+$", "", item)  # bullets (this line's, or the next line's)
    item = item.strip().rstrip(",;").strip().strip("[]").strip()
    if len(item) >= 2 and item[0] == item[-1] and item[0] in "\"'":
        item = item[1:-1].strip()
    item = item.strip("\u201c\u201d").strip()
    return re.sub(r"\s+", " ", item)


def parse_motion_answer(text: str) -> str:
    """The motion prompt in an answer (`Answer: ...`, possibly wrapped in markdown or quotes, or bare)."""
    cleaned = _clean(text)
    lines = [ln for ln in (_strip_item(x) for x in cleaned.splitlines()) if ln]
    if not lines:
        raise PromptParseError(f"prompt_plan.parse_motion_answer: no motion prompt in the LLM answer {_quote(text)}; "
                               f"expected `Answer: <motion prompt>`")
    return lines[0]


# `Object 1:`, `object #2 -`, `Obj. 3)`, `(Object 4):`
_OBJECT_MARK = re.compile(r"[\[(]?\s*\b(?:object|obj\.?)\s*#?\s*(\d+)\s*[\])]?\s*[:\-\u2013\u2014.)]", re.IGNORECASE)
# `1.`, `2)`, `3:` at the start of a line or right after an opening bracket
_NUMBER_MARK = re.compile(r"(?:^|(?<=\[)|(?<=\n))\s*\(?(\d+)\s*[.):]\s+", re.MULTILINE)


def _items_after_marks(text: str, marks: list[re.Match]) -> list[tuple[int, str]]:
    items = []
    for m, nxt in zip(marks, [*marks[1:], None], strict=True):
        end = nxt.start() if nxt is not None else len(text)
        items.append((int(m.group(1)), _strip_item(text[m.end():end])))
    return items


def parse_local_answer(text: str, num_objects: int | None = None) -> list[str]:
    """The local prompts of an answer, object 1 first.

    Accepts the canonical `Answer: [[Object 1: ...] [Object 2: ...]]` and its usual variants: no `Answer:`, markdown
    (bold, code fences, bullets), single brackets, one object per line, `Object #1 -` / `Obj 1)` / `1.` numbering,
    quoted prompts, extra whitespace and newlines, objects listed out of order. Raises `PromptParseError` (quoting the
    answer) when no reading gives prompts numbered 1..K exactly once, or when `num_objects` is given and K differs.
    """
    cleaned = _clean(text)
    marks = list(_OBJECT_MARK.finditer(cleaned))
    if marks:
        items = _items_after_marks(cleaned, marks)
    elif (marks := list(_NUMBER_MARK.finditer(cleaned))):
        items = _items_after_marks(cleaned, marks)
    else:
        groups = re.findall(r"\[([^\[\]]+)\]", cleaned)
        if not groups and _ANSWER.search(text):  # `Answer:` then a bare list, one object per line
            groups = [ln for ln in cleaned.splitlines() if ln.strip()]
        items = [(i + 1, _strip_item(g)) for i, g in enumerate(groups)]
    items = [(n, p) for n, p in items if p]
    if not items:
        raise PromptParseError(f"prompt_plan.parse_local_answer: no local prompts in the LLM answer {_quote(text)}; "
                               f"expected `Answer: [[Object 1: ...] [Object 2: ...]]`")
    numbers = sorted(n for n, _ in items)
    if numbers != list(range(1, len(items) + 1)):
        raise PromptParseError(f"prompt_plan.parse_local_answer: objects numbered {[n for n, _ in items]} in the LLM "
                               f"answer {_quote(text)}; expected each of 1..{len(items)} once")
    prompts = [p for _, p in sorted(items)]
    if num_objects is not None and len(prompts) != num_objects:
        raise PromptParseError(f"prompt_plan.parse_local_answer: {len(prompts)} local prompts for {num_objects} "
                               f"objects (first-frame masks) in the LLM answer {_quote(text)}")
    return prompts


# ------------------------------------------------------------------------------------------------------- planning


@dataclasses.dataclass
class Plan:
    """The prompts of one request. `objects[i]` is the noun phrase of `local_prompts[i]` (used for matching)."""

    caption: str
    motion_prompt: str
    local_prompts: list[str]
    objects: list[str]
    source: str  # "llm" | "offline" | "given"

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


class PlanningError(cli.UserError, ValueError):
    """A caption the offline planner cannot split; the message says how to write it or to set `sample.llm_url`."""


# third-person motion verbs that end an object's noun phrase ("the red square | slides left")
MOTION_VERBS = frozenset("""
    moves slides rises falls drifts runs walks jumps hops flies swims rolls spins rotates turns grows shrinks
    shakes sways bounces climbs crawls dives floats glides leaps lifts lowers opens closes pours rides sails skates
    slips spreads stays stands sits waves wiggles zooms approaches enters exits leaves follows chases crosses circles
    descends ascends advances retreats travels dances plays throws catches kicks pushes pulls eats drinks looks nods
    bends stretches twists flaps flutters races dashes darts sinks melts expands contracts tilts swings hangs
    goes comes heads shifts creeps wanders strolls marches hurries paddles drives steers pedals trots gallops
""".split())
# plural subjects take the bare form ("two dogs | run")
MOTION_VERBS_PLURAL = frozenset("""
    move slide rise fall drift run walk jump hop fly swim roll spin rotate turn grow shrink bounce climb crawl dive
    float glide leap ride sail skate stay stand sit wave dance play chase cross circle race sink swing go come head
""".split())
DETERMINERS = ("a", "an", "the", "one", "two", "three", "four", "some", "another", "its", "his", "her", "their")
# appearance words the motion prompt drops (the local prompt keeps them)
APPEARANCE_WORDS = frozenset("""
    striped dotted checkered plain textured speckled spotted patterned wavy shiny glossy matte metallic wooden fluffy
    furry hairy woolly glass plastic leather transparent translucent bright dark pale old young new small big large
    tiny huge tall short
""".split())
_BACKGROUND = re.compile(r"[,;]?\s*\b(?:in front of|against|on top of|over|on|in|at|under)\s+(?:a|an|the)\b[^,;.]*"
                         r"\b(?:background|backdrop|scene|sky|room|field|meadow|street|floor)\b", re.IGNORECASE)
# a clause boundary is a separator followed by a determiner that opens the next object's noun phrase
_CLAUSE_SPLIT = re.compile(r"\s*(?:,\s*(?:and\s+|while\s+)?|;\s*|\s+while\s+|\s+and\s+|\s+as\s+|\s+whereas\s+)"
                           r"(?=(?:" + "|".join(DETERMINERS) + r")\s)", re.IGNORECASE)


def _split_clause(clause: str) -> tuple[str, str] | None:
    """`"the red square slides left"` -> (`"red square"`, `"slides left"`); None without a recognisable verb."""
    words = clause.split()
    if len(words) < 2:
        return None
    start = 1 if words[0].lower() in DETERMINERS else 0
    for i in range(start + 1, len(words)):
        w = re.sub(r"[^a-z]", "", words[i].lower())
        plural_subject = words[0].lower() in ("two", "three", "four", "some") or words[i - 1].lower().endswith("s")
        if w in MOTION_VERBS or (plural_subject and w in MOTION_VERBS_PLURAL):
            subject = " ".join(words[start:i])
            if words[0].lower() in ("two", "three", "four", "some"):
                subject = words[0].lower() + " " + subject
            return subject, " ".join(words[i:])
    return None


def _without_appearance(phrase: str) -> str:
    kept = [w for w in phrase.split() if w.lower() not in APPEARANCE_WORDS]
    return " ".join(kept) if kept else phrase


def _join(clauses: list[str]) -> str:
    if len(clauses) == 1:
        return clauses[0]
    if len(clauses) == 2 and " while " not in " ".join(clauses):
        return f"{clauses[0]} while {clauses[1]}"
    return ", ".join(clauses[:-1]) + " and " + clauses[-1]


def _sentence(text: str) -> str:
    text = text.strip().rstrip(".")
    return (text[:1].upper() + text[1:] + ".") if text else text


def plan_offline(caption: str) -> Plan:
    """Rule-based planning for captions made of one clause per object.

    The background clause (`", in front of a grey checkered background"`, `"on a sunny meadow"`) is dropped; the rest
    splits into clauses at `while` / `and` / `as` / commas followed by a determiner; each clause's noun phrase ends at
    its first motion verb (`MOTION_VERBS`). Local prompt i is `"the <noun phrase> <motion>"`; the motion prompt joins
    the same clauses without appearance words (`APPEARANCE_WORDS`), keeping colours, which tell the objects apart.
    Raises `PlanningError` when a clause has no known motion verb.
    """
    text = " ".join(caption.strip().split()).rstrip(".!")
    if not text:
        raise PlanningError("prompt_plan.plan_offline: the caption is empty; set config.sample.caption")
    text = re.sub(r"\s+,", ",", _BACKGROUND.sub("", text)).strip().rstrip(",;")
    clauses = [c.strip().rstrip(",;") for c in _CLAUSE_SPLIT.split(text) if c and c.strip()]
    objects, motions = [], []
    for clause in clauses:
        split = _split_clause(clause)
        if split is None:
            if objects:  # a trailing modifier clause ("..., and it spins") belongs to the previous object
                motions[-1] += " and " + clause
                continue
            raise PlanningError(
                f"prompt_plan.plan_offline: no motion verb in {clause!r} of the caption {caption!r}; write one clause "
                f"per object as `the <object> <verb> ...` (verbs: e.g. slides, rises, falls, runs, jumps, spins), or "
                f"set config.sample.llm_url to plan with an LLM")
        objects.append(split[0])
        motions.append(split[1])
    local = [f"the {o} {m}" for o, m in zip(objects, motions, strict=True)]
    motion = _join([f"the {_without_appearance(o)} {m}" for o, m in zip(objects, motions, strict=True)])
    return Plan(caption=caption, motion_prompt=_sentence(motion), local_prompts=local, objects=objects,
                source="offline")


def object_phrase(local_prompt: str) -> str:
    """The noun phrase of a local prompt (`"the left dog runs"` -> `"left dog"`); the whole prompt when no verb is
    recognised (matching then compares every word)."""
    text = local_prompt.strip().rstrip(".")
    if ":" in text:  # the paper's `left dog: the dog runs to the left`
        return text.split(":", 1)[0].strip()
    split = _split_clause(text)
    return split[0] if split else text


def plan_with_llm(caption: str, complete: Callable[[list[dict[str, str]]], str], *, num_objects: int | None = None,
                  object_names: Sequence[str] | None = None, reasks: int = 1) -> Plan:
    """The two LLM requests; `complete(messages) -> text` is e.g. `llm.ChatClient(url).complete`.

    A malformed answer is re-asked `reasks` times with the parse error appended, then raises `PromptParseError`.
    """

    def ask(messages, parse):
        for attempt in range(reasks + 1):
            answer = complete(messages)
            try:
                return parse(answer)
            except PromptParseError as e:
                if attempt == reasks:
                    raise
                messages = [*messages, {"role": "assistant", "content": answer},
                            {"role": "user", "content": f"That answer could not be read ({e}). Answer again in exactly "
                                                        f"the format of the examples."}]
        raise AssertionError("unreachable")

    motion = ask(motion_messages(caption), parse_motion_answer)
    local = ask(local_messages(caption, num_objects, object_names),
                lambda a: parse_local_answer(a, num_objects))
    return Plan(caption=caption, motion_prompt=motion, local_prompts=local,
                objects=[object_phrase(p) for p in local], source="llm")
