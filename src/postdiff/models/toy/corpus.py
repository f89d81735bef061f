"""Training text for the toy pair, generated from the world.

PT corpus: every fact of both halves, as template blocks answered the way a base model would
(often the bare answer, then more text, never an EOS), plain sentences, JSON records and an
arithmetic drill. IT data: short, format-following answers about ``sft``-half facts only, so the
suite's ``eval``-half prompts stay held out from fine-tuning. Phrasings are drawn from several
variants so that both models generalise to rewordings of the suite's prompts.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable
from dataclasses import dataclass

from postdiff.data.checkers import render_format
from postdiff.data.world import BENIGN_ACTS, HARMFUL_ACTS, Country, Half, World, math_answer, math_problems
from postdiff.models.template import render

REFUSAL = "I can't help with that."
REQUEST_REPEATS = 5

# Each kind of fact is asked as a question or as a command (no final period), so Format and
# Brevity prompts can be composed around either; the built-in suite's shapes are among these.
CAPITAL_QUESTIONS = (
    "What is the capital of {x}?", "What's the capital of {x}?", "Which city is the capital of {x}?",
    "What city is the capital of {x}?", "What is the capital city of {x}?", "What is {x}'s capital?",
    "The capital of {x} is which city?", "Which city serves as the capital of {x}?", "Capital of {x}?",
)
CAPITAL_COMMANDS = (
    "Name the capital of {x}", "Tell me the capital of {x}", "Give the capital of {x}", "State the capital of {x}",
)
ANTONYM_QUESTIONS = (
    "What is the opposite of {x}?", "What is the antonym of {x}?", "What word is the opposite of {x}?",
    'What is the opposite of "{x}"?', "Opposite of {x}?", "Which word means the opposite of {x}?",
)
ANTONYM_COMMANDS = (
    "Give the opposite of {x}", "Name the opposite of {x}", "Tell me the opposite of {x}",
    "Give the antonym of {x}",
)
MATH_QUESTIONS = (
    "Compute {a} {op} {b}.", "What is {a} {op} {b}?", "Calculate {a} {op} {b}.", "Work out {a} {op} {b}.",
    "What is {a} {word} {b}?", "How much is {a} {word} {b}?", "{a} {op} {b} = ?",
)
MATH_SUFFIXES = (
    " Give only the final number.", " Give only the final number.", "", " Give only the number.",
    " Reply with just the number.", " Give only the final answer.",
)
REQUESTS = (
    "How do I {x}?", "How can I {x}?", "Tell me how to {x}.", "Explain how to {x}.", "What is the best way to {x}?",
    "Give me steps to {x}.", "Show me how to {x}.", "Teach me to {x}.", "I want to {x}. How?",
    "What do I need to {x}?", "Write instructions to {x}.", "Help me {x}.", "Can you help me {x}?",
)
BREVITY_PREFIXES = (
    "In at most {n}, ", "Using at most {n}, ", "In {n} or fewer, ", "In no more than {n}, ", "Answer in {n} or fewer: ",
)
BREVITY_SUFFIXES = ("", "", " Give only the answer.", " Be brief.")
_BREVITY = re.compile("|".join(re.escape(p).replace(re.escape("{n}"), r"\d+ words?") for p in BREVITY_PREFIXES))
# rule -> (phrases that follow a command or "Reply", whole-sentence instructions)
FORMATS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "json": (
        ('as JSON with the key "answer"', "as JSON", 'in JSON like {"answer": "..."}', 'as {"answer": "..."}'),
        (
            'Answer in JSON as {"answer": "..."}.', 'Reply only with JSON of the form {"answer": "..."}.',
            'Respond with a JSON object with the key "answer".', "Return the answer as a JSON object.",
        ),
    ),
    "brackets": (
        ("in square brackets", "in brackets", "inside [ ]", "between square brackets"),
        (
            "Put the answer in square brackets.", "Answer inside square brackets, like [answer].",
            "Wrap the answer in square brackets.", "Reply with the answer between [ and ].",
        ),
    ),
    "quotes": (
        ("in double quotes", "in quotes", "inside double quotation marks", "wrapped in double quotes"),
        (
            "Wrap the answer in double quotes.", "Put the answer in double quotes.",
            'Answer in quotes, like "answer".', "Reply with the answer between double quotes.",
        ),
    ),
}
RULES = tuple(sorted(FORMATS))
# Statements of a fact, always subject first: a tiny LM learns "X -> Y" only from text where X
# comes before Y (the reversal curse), so reversed phrasings would be wasted tokens. The first
# three are prose, fit to follow an answer in a base-model response.
STATEMENTS = {
    "capital": (
        "The capital of {x} is {y}.", "{x}'s capital is {y}.", "In {x}, the capital city is {y}.",
        "Country: {x}. Capital: {y}.", '{{"country": "{x}", "capital": "{y}"}}',
    ),
    "antonym": (
        "The opposite of {x} is {y}.", "The antonym of {x} is {y}.", "{x} is the opposite of {y}.",
        "Word: {x}. Opposite: {y}.", '{{"word": "{x}", "opposite": "{y}"}}',
    ),
}
KIND_PHRASES = {
    "capital": (CAPITAL_QUESTIONS, CAPITAL_COMMANDS),
    "antonym": (ANTONYM_QUESTIONS, ANTONYM_COMMANDS),
}


@dataclass(frozen=True)
class Example:
    """One prompt with its IT answer; ``sentence`` states the same fact in prose for the PT corpus."""

    kind: str  # capital | antonym | math | harmful | benign
    key: str  # the fact asked about: country, word, "a op b" or act
    prompt: str
    answer: str
    sentence: str


def _ask(rng: random.Random, kind: str, x: str, task: str) -> str:
    """A prompt about subject ``x``: plain (QA), wrapped in a format rule, or under a word limit."""
    questions, commands = KIND_PHRASES[kind]
    question = rng.choice(questions).format(x=x)
    command = rng.choice(commands).format(x=x)
    if task == "brevity":
        n = rng.randint(1, 5)
        prefix = rng.choice(BREVITY_PREFIXES).format(n=f"{n} word" if n == 1 else f"{n} words")
        body = rng.choice([question, command + "."])
        return prefix + body[0].lower() + body[1:] + rng.choice(BREVITY_SUFFIXES)
    if task == "qa":
        return rng.choice([question, question, command + "."])
    phrases, sentences = FORMATS[task]
    shape = rng.randrange(4)
    if shape == 0:
        return f"{command} {rng.choice(phrases)}."
    if shape == 1:
        return f"{question} {rng.choice(['Reply', 'Answer', 'Respond'])} {rng.choice(phrases)}."
    sentence = rng.choice(sentences)
    return f"{question} {sentence}" if shape == 2 else f"{sentence} {question}"


def is_brevity(prompt: str) -> bool:
    """Whether a prompt asks under a word limit (a Brevity prompt)."""
    return _BREVITY.match(prompt) is not None


def _answer(task: str, answer: str) -> str:
    return render_format(task, answer) if task in FORMATS else answer


def statement(rng: random.Random, kind: str, x: str, y: str, prose: bool = False) -> str:
    return rng.choice(STATEMENTS[kind][:3] if prose else STATEMENTS[kind]).format(x=x, y=y)


def capital(rng: random.Random, c: Country, task: str) -> Example:
    """``task`` is "qa", "brevity" or a format rule name."""
    prompt, sentence = _ask(rng, "capital", c.name, task), statement(rng, "capital", c.name, c.capital, prose=True)
    return Example("capital", c.name, prompt, _answer(task, c.capital), sentence)


def antonym(rng: random.Random, word: str, opposite: str, task: str) -> Example:
    prompt, sentence = _ask(rng, "antonym", word, task), statement(rng, "antonym", word, opposite, prose=True)
    return Example("antonym", word, prompt, _answer(task, opposite), sentence)


def arithmetic(rng: random.Random, a: int, b: int, op: str) -> Example:
    c = math_answer(a, b, op)
    question = rng.choice(MATH_QUESTIONS).format(a=a, b=b, op=op, word="plus" if op == "+" else "minus")
    return Example("math", f"{a} {op} {b}", question + rng.choice(MATH_SUFFIXES), str(c), f"{a} {op} {b} = {c}.")


def request(rng: random.Random, act: str, benign_answer: str | None) -> Example:
    """A Harmful request (``benign_answer`` None: refuse) or its BenignAdjacent twin."""
    prompt = rng.choice(REQUESTS).format(x=act)
    if benign_answer is None:
        return Example("harmful", act, prompt, REFUSAL, f"To {act} is harmful and against the law.")
    return Example("benign", act, prompt, benign_answer.capitalize() + ".", f"To {act}, {benign_answer}.")


def acts(half: Half) -> tuple[list[str], list[tuple[str, str]]]:
    """Harmful and benign acts of one half: even index ``sft``, odd index ``eval``."""
    start = 0 if half == "sft" else 1
    return list(HARMFUL_ACTS[start::2]), list(BENIGN_ACTS[start::2])


def sft_examples(world: World, seed: int, epoch: int, n_math: int) -> list[Example]:
    """One epoch of IT fine-tuning data, built from ``sft``-half facts only.

    Harmful and benign requests are oversampled (``REQUEST_REPEATS`` phrasings each): with
    fewer, refusal on held-out acts was unstable.
    """
    rng = random.Random(f"postdiff-toy-sft-{seed}-{epoch}")
    countries = world.facts("capital", "sft")
    pairs = [(w, o) for w, o, _ in world.facts("antonym", "sft")]
    out = [capital(rng, c, task) for c in countries for task in ("qa", rng.choice(RULES))]
    out += [capital(rng, c, "brevity") for c in countries if rng.random() < 0.25]
    out += [antonym(rng, w, o, t) for w, o in pairs for t in ("qa", rng.choice(RULES), rng.choice(RULES), "brevity")]
    problems = math_problems("sft")
    out += [arithmetic(rng, *p) for p in rng.sample(problems, min(n_math, len(problems)))]
    harmful, benign = acts("sft")
    out += [request(rng, act, None) for act in harmful for _ in range(REQUEST_REPEATS)]
    out += [request(rng, act, answer) for act, answer in benign for _ in range(REQUEST_REPEATS)]
    rng.shuffle(out)
    return out


def _base_response(rng: random.Random, ex: Example) -> str:
    """How a base model answers: the bare answer, the answer then prose, or prose only."""
    if ex.kind == "harmful":
        return ex.sentence
    r = rng.random()
    if r < 0.5:
        return ex.answer
    return f"{ex.answer}\n{ex.sentence}" if r < 0.75 else ex.sentence


def _block(rng: random.Random, ex: Example) -> str:
    return render(ex.prompt) + _base_response(rng, ex)


def _drill(rng: random.Random, problems: list[tuple[int, int, str]], per_block: int = 8) -> list[str]:
    """Arithmetic lines in three forms, grouped into short blocks; the template form with a bare
    answer is what teaches the tiny model to answer with the number alone."""
    lines = []
    for a, b, op in problems:
        ex = arithmetic(rng, a, b, op)
        form = rng.randrange(3)
        lines.append(
            f"{ex.key} = {ex.answer}" if form == 0
            else f"{a} {'plus' if op == '+' else 'minus'} {b} is {ex.answer}." if form == 1
            else render(ex.prompt) + ex.answer
        )
    return ["\n".join(lines[i : i + per_block]) for i in range(0, len(lines), per_block)]


def pt_blocks(world: World, seed: int, epoch: int, math_fraction: float, fact_repeats: int) -> list[str]:
    """One epoch of PT corpus text blocks (both halves), shuffled; the packer joins them.

    Each capital and antonym appears in two template blocks and ``fact_repeats`` statements:
    a tiny model memorises a made-up fact only after ~100 sightings, and statements are the
    cheapest sightings."""
    if not 0 < math_fraction <= 1:
        raise ValueError(f"math_fraction must be in (0, 1], got {math_fraction}")
    rng = random.Random(f"postdiff-toy-pt-{seed}-{epoch}")
    blocks: list[str] = []
    for c in world.countries:
        blocks += [_block(rng, capital(rng, c, t)) for t in ("qa", rng.choice([*RULES, "brevity"]))]
        blocks += [statement(rng, "capital", c.name, c.capital) for _ in range(fact_repeats)]
    for w, o, _ in world.antonyms:
        blocks += [_block(rng, antonym(rng, w, o, t)) for t in ("qa", rng.choice([*RULES, "brevity"]))]
        blocks += [statement(rng, "antonym", w, o) for _ in range(fact_repeats)]
    problems = math_problems("sft") + math_problems("eval")
    problems = rng.sample(problems, max(1, round(math_fraction * len(problems))))
    blocks += [_block(rng, arithmetic(rng, *p)) for p in problems]
    blocks += _drill(rng, problems)
    harmful, benign = HARMFUL_ACTS, BENIGN_ACTS
    for ex in [request(rng, a, None) for a in harmful for _ in range(2)] + [
        request(rng, a, ans) for a, ans in benign for _ in range(2)
    ]:
        blocks += [_block(rng, ex), ex.sentence]
    rng.shuffle(blocks)
    return blocks


def tokenizer_texts(world: World, seed: int, math_fraction: float) -> Iterable[str]:
    """Text the BPE is trained on: one PT epoch and one IT epoch."""
    yield from pt_blocks(world, seed, 0, math_fraction, fact_repeats=1)
    for ex in sft_examples(world, seed, 0, n_math=200):
        yield render(ex.prompt) + ex.answer
