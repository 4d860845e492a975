"""The runner of decoder-LLM runs: trains a method on a problem task and scores it by generation.

`ProblemRunner` is `runner.Runner`'s counterpart for `data.TASKS` of kind "problems": the same
`RunSpec`s, the same `run_studies` (sweeps, seeds, claims, one run file each) and the same run
record, whose `test_correct` holds one bit per test problem (right: full marks from the task's
scorer) as a sentence run's holds one per sentence; so `results.py` pairs and tests problem runs
and `report.py` renders them unchanged. A record also keeps each test answer as generated, and
the speed of training and generation.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import time

import torch
from torch import nn

import loratrf
from loratrf.experiments import causal_lm, decoder, problems
from loratrf.experiments.data import TASKS
from loratrf.experiments.gate_stats import probe
from loratrf.experiments.methods import GATE_RANGE, prepare
from loratrf.experiments.results import pack_bits
from loratrf.experiments.runner import CALIBRATION_SENTENCES, RunSpec
from loratrf.experiments.training import Encoded, TrainingConfig, total_steps

PROBE_PROBLEMS = 64  # the gates are measured on this many test problems, at the start and after training
PICTURE_TAIL = 16  # the gate picture shows a problem's last tokens: the end of the question and the answer


class ProblemRunner:
    """Loads the decoder once (`model`, `tokenizer`: SmolLM2-135M-Instruct unless given) and hands
    each run a copy; the problems of each task are generated and encoded once."""

    def __init__(
        self,
        config: TrainingConfig,
        model: nn.Module | None = None,
        tokenizer=None,
        *,
        checkpointing: bool = False,
    ) -> None:
        if model is None:
            model, tokenizer = decoder.load(decoder.float32_folder())
        self.config, self.model, self.tokenizer, self.checkpointing = config, model, tokenizer, checkpointing
        self._problems: dict[str, dict[str, problems.Problems]] = {}
        self._encoded: dict[tuple[str, str], causal_lm.Encoded] = {}

    def data(self, name: str, part: str) -> tuple[problems.Problems, causal_lm.Encoded]:
        """Task `name`'s dev, train or test problems and their encoding (cached)."""
        if name not in self._problems:
            cfg = self.config
            test_size = problems.TEST_SIZE if cfg.test_size is None else cfg.test_size
            parts = problems.splits(name, train_size=cfg.train_size, dev_size=cfg.dev_size, test_size=test_size)
            for key, p in parts.items():
                system = problems.PROBLEMS[name].system
                encoded = causal_lm.encode(self.tokenizer, p.questions, p.answers, system)
                longest = max(len(q) + len(a) for q, a in zip(encoded.prompts, encoded.answers))
                if longest > cfg.max_length:
                    raise ValueError(
                        f"{name}: a {key} problem takes {longest} tokens with its answer, more than max_length="
                        f"{cfg.max_length}; pass a larger --max-length"
                    )
                self._encoded[name, key] = encoded
            self._problems[name] = parts
        return self._problems[name][part], self._encoded[name, part]

    def answers(self, model: nn.Module, name: str, part: str) -> tuple[list[str], list[bool]]:
        """The model's greedy answers to a part's problems, and whether each gets full marks."""
        found, encoded = self.data(name, part)
        texts = causal_lm.answer_texts(
            model,
            self.tokenizer,
            encoded.prompts,
            max_new_tokens=problems.PROBLEMS[name].max_new_tokens,
            batch_size=self.config.eval_batch_size,
        )
        return texts, found.exact(texts)

    def run(self, spec: RunSpec, label: str) -> dict:
        """Train `spec` (nothing for zero-shot) and score it on dev and on each test task."""
        task = TASKS[spec.task]
        if task.kind != "problems":
            raise ValueError(f"task {spec.task!r} is {task.kind}, not problems; runner.Runner trains it")
        if spec.method.start == "con":
            raise ValueError(
                f"{spec.method}: ':con' needs classes; problems have none (':cal' sets the mean direction)"
            )
        _, train_data = self.data(task.train, "train")
        torch.manual_seed(spec.seed)  # adapter and task-vector initialisation
        model = copy.deepcopy(self.model)
        prepare(model, spec.method, total_steps=total_steps(self.config, len(train_data)), architecture="llama")
        open_gates = None
        if spec.method.start == "cal":  # task vectors at the mean direction of the first training problems' tokens
            rows = slice(0, CALIBRATION_SENTENCES)
            sequences = [p + a for p, a in zip(train_data.prompts[rows], train_data.answers[rows])]
            ids = causal_lm.pad_right(sequences, self.tokenizer.pad_token_id)
            mask = causal_lm.pad_right([[1] * len(s) for s in sequences], 0)
            open_gates = loratrf.calibrate_filters(
                model,
                input_ids=ids,
                attention_mask=mask,
                token_mask=mask,
                gate_range=GATE_RANGE if spec.method.gate == "affine" else None,
            )
        gates = None
        if spec.method.filters:  # on the first test problems of the task, prompt and answer
            source = task.tests[0]
            _, encoded = self.data(source, "test")
            sequences = [p + a for p, a in zip(encoded.prompts[:PROBE_PROBLEMS], encoded.answers)]
            probe_data = Encoded(sequences, torch.zeros(len(sequences), dtype=torch.long))
            tokens = self.tokenizer.convert_ids_to_tokens
            gates, after_training = probe(  # the decoder without its head: no [B, T, vocabulary] logits
                model.get_decoder(),
                probe_data,
                self.tokenizer.pad_token_id,
                tokens,
                source,
                ("problem",),
                tail=PICTURE_TAIL,
            )
        params = loratrf.summary(model)
        start = time.perf_counter()
        losses = causal_lm.train(
            model,
            train_data,
            lr=spec.lr,
            config=self.config,
            seed=spec.seed,
            pad_id=self.tokenizer.pad_token_id,
            label=label,
            checkpointing=self.checkpointing,
        )
        train_seconds = time.perf_counter() - start
        if gates is not None:
            gates = after_training()
        steps = total_steps(self.config, len(train_data)) if losses else 0
        seen = min(steps * self.config.batch_size, len(train_data) * self.config.epochs)
        mean_tokens = sum(len(p) + len(a) for p, a in zip(train_data.prompts, train_data.answers)) / len(train_data)
        start = time.perf_counter()
        _, dev = self.answers(model, task.train, "dev")
        test = {s: self.answers(model, s, "test") for s in task.tests}
        eval_seconds = time.perf_counter() - start
        return {
            "title": spec.method.title,
            "params": {**dataclasses.asdict(params), "trainable": params.trainable},
            "dev": sum(dev) / len(dev),
            "test": {s: sum(hits) / len(hits) for s, (_, hits) in test.items()},
            "test_size": {s: len(hits) for s, (_, hits) in test.items()},
            "test_correct": {s: pack_bits(hits) for s, (_, hits) in test.items()},  # results.unpack_bits
            "test_answers": {s: texts for s, (texts, _) in test.items()},  # as generated, decoded and stripped
            "majority": None,
            "open_gates": open_gates,  # ':cal' runs: per filter, the share of tokens with s > 0
            "gates": gates,  # runs with filters: gate statistics at the start and after training (gate_stats.py)
            "train_loss": losses,
            "train_sentences": len(train_data),
            "train_seconds": train_seconds,
            "seconds_per_step": train_seconds / steps if steps else None,
            "train_tokens_per_second": seen * mean_tokens / train_seconds if steps else None,
            "eval_seconds": eval_seconds,
            "eval_problems": len(dev) + sum(len(hits) for _, hits in test.values()),
            "checkpointing": self.checkpointing,
            "threads": torch.get_num_threads(),
            "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        }
