"""The LLM experiments' data: reasoning problems that `reasoning-gym` generates from a seed, each
with its own exact scorer.

A problem task (`data.TASKS[name]`, kind "problems") is one reasoning-gym dataset with fixed
settings (`PROBLEMS[name]`). Its dev, train and test problems come from three fixed seeds
(`SPLIT_SEEDS`), so they never change with the training seed; a training problem whose question
is also a dev or test question is dropped, so the model is never tested on a problem it trained on.
An answer is right when the task's own scorer gives it full marks (`score_answer(...) == 1.0`):
exact match after the scorer's own normalisation, and nothing for partial credit.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from types import MappingProxyType

from loratrf.experiments.packages import require

REASONING_GYM = "reasoning-gym==0.1.25"
SPLIT_SEEDS = {"dev": 1000, "train": 2000, "test": 3000}
TEST_SIZE = 200  # test problems when `TrainingConfig.test_size` is None (a generator has no "all")


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


def generate(name: str, part: str, size: int) -> Problems:
    """The first `size` problems of task `name` that the seed of `part` ("dev", "train" or
    "test") gives (reasoning-gym builds item i from seed + i, so a larger `size` only adds problems)."""
    if name not in PROBLEMS:
        raise ValueError(f"unknown problem task {name!r}; known: {sorted(PROBLEMS)}")
    if part not in SPLIT_SEEDS:
        raise ValueError(f"part must be one of {tuple(SPLIT_SEEDS)}, got {part!r}")
    gym = require("reasoning_gym", REASONING_GYM, "llm")
    spec = PROBLEMS[name]
    dataset = gym.create_dataset(spec.dataset, size=size, seed=SPLIT_SEEDS[part], **spec.settings)
    entries = tuple(dataset[i] for i in range(size))
    return Problems(tuple(e["question"] for e in entries), tuple(str(e["answer"]) for e in entries), entries, dataset)


def splits(name: str, *, train_size: int, dev_size: int, test_size: int) -> dict[str, Problems]:
    """Dev, train and test problems of task `name`; training problems whose question is a dev or
    test question are dropped (more are generated, so training keeps `train_size`)."""
    dev, test = generate(name, "dev", dev_size), generate(name, "test", test_size)
    held_out = set(dev.questions) | set(test.questions)
    size = train_size
    while True:
        candidates = generate(name, "train", size)
        kept = [i for i, q in enumerate(candidates.questions) if q not in held_out][:train_size]
        if len(kept) == train_size or size > 20 * train_size:
            break
        size *= 2
    if len(kept) < train_size:
        raise ValueError(f"{name}: only {len(kept)} training problems differ from dev and test; ask for fewer")
    train = Problems(
        tuple(candidates.questions[i] for i in kept),
        tuple(candidates.answers[i] for i in kept),
        tuple(candidates.entries[i] for i in kept),
        candidates.scorer,
    )
    return {"dev": dev, "train": train, "test": test}
