"""The LLM experiments' data: reasoning problems that `reasoning-gym` generates from a seed, each
with its own exact scorer.

A problem task (`data.TASKS[name]`, kind "problems") is one reasoning-gym dataset with fixed
settings (`PROBLEMS[name]`). Its dev, train and test problems come from three fixed seeds
(`SPLIT_SEEDS`), so they never change with the training seed. Each question appears once in all
three parts: a repeated question is skipped and the next one drawn, so the model is never tested
on a problem it trained on, dev never overlaps test, and no test problem counts twice.
An answer is right when the task's own scorer gives it full marks (`score_answer(...) == 1.0`):
exact match after the scorer's own normalisation, and nothing for partial credit.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence, Set
from types import MappingProxyType

from loratrf.experiments.packages import require

REASONING_GYM = "reasoning-gym==0.1.25"
SPLIT_SEEDS = {"dev": 1000, "train": 2000, "test": 3000}
TEST_SIZE = 200  # test problems when `TrainingConfig.test_size` is None (a generator has no "all")
MAX_DRAWS = 32  # a part draws at most this many problems per distinct one it keeps


@dataclasses.dataclass(frozen=True)
class ProblemSet:
    """A reasoning-gym dataset (`dataset`, built with `settings`) and how long an answer may be."""

    dataset: str
    settings: Mapping[str, object]
    max_new_tokens: int  # generation stops here if the model has not ended its answer
    system: str | None = None  # the system message of every prompt (None: the chat template's default)

    def __post_init__(self) -> None:
        object.__setattr__(self, "settings", MappingProxyType(dict(self.settings)))


# Measured on SmolLM2-135M-Instruct (docs/llm.md): zero-shot it answers few of these exactly,
# and a few hundred fine-tuning steps on CPU teach it the answer format and much of the arithmetic.
PROBLEMS: dict[str, ProblemSet] = {
    "arithmetic": ProblemSet(
        "basic_arithmetic",
        {
            "min_terms": 2,
            "max_terms": 2,
            "min_digits": 1,
            "max_digits": 2,
            "operators": ("+", "-"),
            "allow_parentheses": False,
            "allow_negation": False,
        },
        max_new_tokens=8,
        system="Give only the final answer.",
    ),
    # Candidates of the LLM studies (docs/results-llm.md says which were chosen and why): word
    # problems of counting and adding (which animal has how many legs; "Alice in Wonderland":
    # how many sisters does Alice's brother have; how long a meeting from 09:06 to 16:19 was, or
    # from 09:06:41 to 16:19:02, or between two dates), a family-relation question answered in
    # one word, GSM8K's templates with new numbers, and whether a syllogism's conclusion follows
    # (half do not).
    "legs": ProblemSet(
        "leg_counting",
        {"min_animals": 1, "max_animals": 2, "min_instances": 1, "max_instances": 5},
        max_new_tokens=8,
        system="Give only the final answer.",
    ),
    "legs-hard": ProblemSet(
        "leg_counting",
        {"min_animals": 2, "max_animals": 3, "min_instances": 1, "max_instances": 10},
        max_new_tokens=8,
        system="Give only the final answer.",
    ),
    "aiw": ProblemSet("aiw", {}, max_new_tokens=8, system="Give only the final answer."),
    "family": ProblemSet("family_relationships", {}, max_new_tokens=8, system="Give only the final answer."),
    "gsm_symbolic": ProblemSet("gsm_symbolic", {}, max_new_tokens=8, system="Give only the final answer."),
    "durations": ProblemSet(
        "time_intervals", {"task_types": ("time",)}, max_new_tokens=8, system="Give only the final answer."
    ),
    "durations-hms": ProblemSet(  # HH:MM:SS: 8 characters, one token each, then the end token
        "time_intervals", {"task_types": ("time_seconds",)}, max_new_tokens=12, system="Give only the final answer."
    ),
    "durations-formats": ProblemSet(  # HH:MM, HH:MM:SS or HH:MM:SS.mmm, as the question asks
        "time_intervals",
        {"task_types": ("time", "time_seconds", "time_ms")},
        max_new_tokens=16,
        system="Give only the final answer.",
    ),
    "time_intervals": ProblemSet(  # its defaults: times, with seconds or milliseconds, dates, datetimes
        "time_intervals", {}, max_new_tokens=24, system="Give only the final answer."
    ),
    "syllogism": ProblemSet(
        "syllogism", {"invalid_ratio": 0.5}, max_new_tokens=8, system="Give only the final answer."
    ),
}


@dataclasses.dataclass(frozen=True)
class Problems:
    """Questions, their reference answers and the reasoning-gym entries that score them."""

    questions: tuple[str, ...]
    answers: tuple[str, ...]
    entries: tuple[Mapping, ...]
    scorer: object  # the reasoning-gym dataset: `scorer.score_answer(answer, entry) -> float`

    def __len__(self) -> int:
        return len(self.questions)

    def exact(self, generated: Sequence[str]) -> list[bool]:
        """Whether each generated answer gets full marks from the task's scorer."""
        if len(generated) != len(self):
            raise ValueError(f"{len(generated)} answers for {len(self)} problems")
        return [self.scorer.score_answer(text, entry) == 1.0 for text, entry in zip(generated, self.entries)]


def generate(name: str, part: str, size: int, exclude: Set[str] = frozenset()) -> Problems:
    """The first `size` distinct problems of task `name` that the seed of `part` ("dev", "train"
    or "test") gives, skipping questions in `exclude` and problems whose own reference answer
    the scorer does not mark right (reasoning-gym builds item i from seed + i, so a larger `size`
    only adds problems)."""
    if name not in PROBLEMS:
        raise ValueError(f"unknown problem task {name!r}; known: {sorted(PROBLEMS)}")
    if part not in SPLIT_SEEDS:
        raise ValueError(f"part must be one of {tuple(SPLIT_SEEDS)}, got {part!r}")
    gym = require("reasoning_gym", REASONING_GYM, "llm")
    spec = PROBLEMS[name]
    drawn = size
    while True:
        dataset = gym.create_dataset(spec.dataset, size=drawn, seed=SPLIT_SEEDS[part], **spec.settings)
        seen, entries = set(exclude), []
        for i in range(drawn):
            entry = dataset[i]
            if entry["question"] not in seen and dataset.score_answer(str(entry["answer"]), entry) == 1.0:
                seen.add(entry["question"])
                entries.append(entry)
                if len(entries) == size:
                    questions = tuple(e["question"] for e in entries)
                    return Problems(questions, tuple(str(e["answer"]) for e in entries), tuple(entries), dataset)
        if drawn >= MAX_DRAWS * size:
            raise ValueError(
                f"{name}: {len(entries)} of {drawn} {part} problems are new questions, fewer than {size}; ask for fewer"
            )
        drawn *= 2


def splits(name: str, *, train_size: int, dev_size: int, test_size: int) -> dict[str, Problems]:
    """Dev, test and train problems of task `name`, each question once in all three: the test
    problems leave out dev's questions, the training problems both."""
    dev = generate(name, "dev", dev_size)
    test = generate(name, "test", test_size, exclude=set(dev.questions))
    train = generate(name, "train", train_size, exclude=set(dev.questions) | set(test.questions))
    return {"dev": dev, "train": train, "test": test}
