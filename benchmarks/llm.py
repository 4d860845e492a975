"""SmolLM2-135M (LLaMA architecture): the fine-tuning step and greedy decoding, loratrf beside PEFT.

    python benchmarks/llm.py                      # the full run (about 30 minutes on 2 cores, 12 of them compiling)
    python benchmarks/llm.py --quick --out /tmp/llm.md   # 2 small layers, 2 rounds: checks that it runs

The model is SmolLM2-135M-Instruct in float32 (`loratrf.experiments.decoder`, from its pip
package); where that is absent, a `LlamaForCausalLM` of its config (30 layers, hidden 576, 9 query
and 3 key/value heads, SwiGLU 1536, vocabulary 49152, tied embeddings) with random weights: the
timings and memory do not depend on the values. The report says which ran.

Measured, each as a ratio in one interleaved run (`timing.interleaved`: every method once per
round, the order rotating, ratios taken within a round; median and p25–p75 over rounds):

- **the fine-tuning step**: batch 8 x 128 random tokens, causal-LM loss, backward, AdamW over the
  adapters; against the floor, one rank-1 adapter on layer 0's q_proj (backward still runs
  through every layer);
- **peak memory of that step** beside PEFT's, with and without gradient checkpointing (a fresh
  process per case: the most resident memory two steps add over what is held between steps);
- **greedy decoding with the KV cache** at batch 1 and 16: a 16-token prompt, then 32 new tokens,
  one forward per token on the model itself (`logits_to_keep=1`), against the base model; and
  what one filter call costs inside that decoding at batch 1, beside one elementwise op;
- **compiled decoding**: the same at batch 1 with `torch.compile(model, dynamic=True)`, against
  the compiled base model, with the time to compile and a check of the tokens.

The section it writes goes at the top of `--out` (docs/benchmarks.md, which `benchmarks/run.py`
writes first), replacing an earlier one.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import os
import re
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import torch
import transformers
from torch import nn

import loratrf
from cases import ALPHA, installed, version
from loratrf.filter import FilterDispatch
from quantized import PROJECTIONS, SMOLLM2
from quantized import TARGETS as ALL7  # LoRA on all seven projections
from timing import Timing, cpu_model, interleaved, quartiles

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- llm.py: begin -->", "<!-- llm.py: end -->"
OUD = r".*\.(o_proj|up_proj|down_proj)"
LAYERS = r"model\.layers\.\d+"
FLOOR = "floor: rank-1 LoRA on layer 0's q_proj"
LORA7, OUD_NAME, TRF = "loratrf LoRA-7", "loratrf LoRA o,up,down", "loratrf LoRATRF o,up,down + filters"
PEFT7, PEFT_OUD = "PEFT LoRA-7", "PEFT LoRA o,up,down"
CACHED = ", cached effective weights"
MERGED = ", LoRA merged (filters run)"
COMPILED_METHODS = ("base model", LORA7 + " unmerged", TRF + ", unmerged", TRF + MERGED)
EAGER_BASE = "base model, eager (not compiled)"
RANK = 8


@dataclass
class Sizes:
    layers: int | None = None  # None: the model's own (30); --quick: 2 layers of width 64, random weights
    batch: int = 8
    seq: int = 128
    decode_batches: tuple[int, ...] = (1, 16)
    prompt: int = 16
    new_tokens: int = 32
    train_rounds: int = 3
    decode_rounds: int = 5


QUICK = Sizes(layers=2, batch=2, seq=16, decode_batches=(1, 2), prompt=4, new_tokens=4, train_rounds=2, decode_rounds=2)
TINY = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, vocab_size=512)


# --- the model and the methods ----------------------------------------------------------------


def base_model(sizes: Sizes) -> tuple[nn.Module, str]:
    """SmolLM2-135M-Instruct if its package is installed, else its architecture with random weights."""
    if sizes.layers is None:
        try:
            from loratrf.experiments import decoder

            model, _ = decoder.load(decoder.float32_folder())
            return model.eval(), "SmolLM2-135M-Instruct (pretrained weights, float32)"
        except (ImportError, OSError, loratrf.LoRATRFError) as error:
            print(f"SmolLM2-135M-Instruct is not available ({error}); random weights instead", file=sys.stderr)
    config = dict(SMOLLM2) if sizes.layers is None else {**SMOLLM2, **TINY, "num_hidden_layers": sizes.layers}
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config)).eval()
    return model, f"LlamaForCausalLM of SmolLM2-135M's config, {config['num_hidden_layers']} layers, random weights"


def trained(model: nn.Module) -> nn.Module:
    """Adapter factors with values, as after some training (B starts at zero), in eval mode."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and name.endswith((".V", "lora_B.default.weight")):
                p.normal_(0.0, 0.02)
    return model.eval()


def loratrf_model(base: nn.Module, copied: bool = True, **options) -> nn.Module:
    """loratrf's adapters on a copy of `base` (on `base` itself with `copied=False`)."""
    model = copy.deepcopy(base) if copied else base
    loratrf.inject(model, alpha=ALPHA, **options)
    return trained(model)


def peft_model(base: nn.Module, targets: tuple[str, ...], copied: bool = True) -> nn.Module:
    """PEFT's LoRA; the model it wraps is returned (its layers replaced in place), so that every
    method is called the same way."""
    import peft

    config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(targets), lora_dropout=0.0)
    return trained(peft.get_peft_model(copy.deepcopy(base) if copied else base, config).get_base_model())


def training_models(base: nn.Module, copied: bool = True) -> dict[str, Callable[[], nn.Module]]:
    """Each training method's model, made on demand (from a copy of `base`, or `base` itself)."""
    found = {
        FLOOR: lambda: loratrf_model(base, copied, targets=[r"model\.layers\.0\.self_attn\.q_proj"], rank=1),
        LORA7: lambda: loratrf_model(base, copied, targets=[ALL7], rank=RANK),
        OUD_NAME: lambda: loratrf_model(base, copied, targets=[OUD], rank=RANK),
        TRF: lambda: loratrf_model(base, copied, targets=[OUD], filters=[LAYERS], rank=RANK),
    }
    if installed("peft"):
        found[PEFT7] = lambda: peft_model(base, PROJECTIONS, copied)
        found[PEFT_OUD] = lambda: peft_model(base, ("o_proj", "up_proj", "down_proj"), copied)
    return found


def training_step(model: nn.Module, ids: torch.Tensor, checkpointing: bool = False) -> Callable[[], None]:
    model.train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def filter_share(base: nn.Module, sizes: Sizes, rounds: int) -> Timing:
    """The filter's forward + backward against its host's (decoder layer 0 with LoRA on o, up,
    down), on the same hidden states `[batch, seq, hidden]`, in process CPU time on one thread: a
    component figure that a busy machine disturbs less than the step's wall time."""
    layer = copy.deepcopy(base.model.layers[0])
    loratrf.inject(layer, targets=[OUD], rank=RANK, alpha=ALPHA)
    trained(layer).train()
    f = loratrf.TaskAwareFilter(base.config.hidden_size, RANK, ALPHA)
    trained(f).train()
    g = torch.Generator().manual_seed(0)
    h = torch.randn(sizes.batch, sizes.seq, base.config.hidden_size, generator=g).requires_grad_()
    grad = torch.randn(h.shape, generator=g)
    position = base.model.rotary_emb(h, torch.arange(sizes.seq)[None].expand(sizes.batch, -1))

    def host() -> None:
        out = layer(h, attention_mask=None, position_embeddings=position)
        (out[0] if isinstance(out, tuple) else out).backward(grad)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # with more, CPU time would count OpenMP's spinning threads too
    try:
        return interleaved({"layer": host, "filter": lambda: f(h).backward(grad)}, "layer", rounds, 1, "cpu")["filter"]
    finally:
        torch.set_num_threads(threads)


def greedy(model: nn.Module, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """`new_tokens` tokens by greedy decoding with a KV cache (one forward per token); `model`
    may be a compiled model."""
    cache = transformers.DynamicCache(config=model.config)
    out, tokens = ids, []
    with torch.no_grad():
        for _ in range(new_tokens):
            logits = model(input_ids=out, cache=cache, use_cache=True, logits_to_keep=1).logits
            out = logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(out)
    return torch.cat(tokens, dim=1)


def decoding_models(base: nn.Module) -> dict[str, nn.Module]:
    """Each decoding method's model; the cached ones hold their effective weights for the whole run."""
    lora7 = loratrf_model(base, targets=[ALL7], rank=RANK)
    trf = loratrf_model(base, targets=[OUD], filters=[LAYERS], rank=RANK)
    merged = copy.deepcopy(trf)
    loratrf.merge(merged)
    # the base model a copy too, as every other is: a copy's tensors sit in freshly allocated memory
    found = {"base model": copy.deepcopy(base), LORA7 + " unmerged": lora7}
    found[LORA7 + " unmerged" + CACHED] = copy.deepcopy(lora7)
    if installed("peft"):
        found[PEFT7 + " unmerged"] = peft_model(base, PROJECTIONS)
    found |= {TRF + ", unmerged": trf, TRF + ", unmerged" + CACHED: copy.deepcopy(trf)}
    found[TRF + MERGED] = merged
    found[TRF + MERGED + CACHED] = copy.deepcopy(merged)  # the filters' [U | t]ᵀ and |t| cached
    return found


def forming_time(model: nn.Module, vocab: int) -> float:
    """Milliseconds to form every effective weight of `model`: its first one-token forward inside
    `cache_effective_weights`, less the second."""
    ids = torch.randint(0, vocab, (1, 1), generator=torch.Generator().manual_seed(0))
    times = []
    with loratrf.cache_effective_weights(model), torch.no_grad():
        for _ in range(2):
            start = time.perf_counter()
            model(input_ids=ids)
            times.append(time.perf_counter() - start)
    return 1e3 * (times[0] - times[1])


def filter_call_cost(model: nn.Module, sizes: Sizes, vocab: int, clock: str) -> dict[str, tuple[float, ...]]:
    """Microseconds per filter call inside batch-1 decoding of `model` (merged LoRATRF), per
    round: decoding with every filter's work replaced by one elementwise op (`h + 0`) and as it
    is, each less decoding with the filters replaced by the identity, over the number of calls."""
    ids = torch.randint(0, vocab, (1, sizes.prompt), generator=torch.Generator().manual_seed(2))
    stand_ins = {
        "identity": lambda dispatch, host, h: h,
        "one elementwise op": lambda dispatch, host, h: h + 0,
        "the filter": FilterDispatch.filter,
    }

    def decode(stand_in: Callable) -> None:
        with mock.patch.object(FilterDispatch, "filter", stand_in):
            greedy(model, ids, sizes.new_tokens)

    runs = {name: (lambda f=f: decode(f)) for name, f in stand_ins.items()}
    timings = interleaved(runs, "identity", 2 * sizes.decode_rounds + 1, warmup=1, clock=clock)
    calls = sizes.new_tokens * sum(isinstance(m, loratrf.TaskAwareFilter) for m in model.modules())
    idle = timings["identity"].times
    return {
        name: tuple(1e6 * (t - i) / calls for t, i in zip(timings[name].times, idle)) for name in list(stand_ins)[1:]
    }


@dataclass
class Compiled:
    """Greedy decoding of `torch.compile`d models at batch 1: each method's seconds to compile
    (its first run, less an eager run), whether it gave the eager model's tokens, and the timings
    against the compiled base model (the eager base model beside it)."""

    seconds: dict[str, float]
    same_tokens: dict[str, bool]
    timings: dict[str, Timing]


def compiled_decoding(base: nn.Module, sizes: Sizes, vocab: int, clock: str) -> Compiled:
    """The decode step as users compile it: `torch.compile(model, dynamic=True)` (inductor; the
    cache grows every step), for the base model and loratrf's LoRA-7 and LoRATRF methods. The
    models share their Python code, so each adds compiled entries to the same code objects:
    torch's limit of 8 is raised, and reaching it raises instead of running eagerly."""
    models = {name: m for name, m in decoding_models(base).items() if name in COMPILED_METHODS}
    ids = torch.randint(0, vocab, (1, sizes.prompt), generator=torch.Generator().manual_seed(1))
    torch._dynamo.reset()
    with torch._dynamo.config.patch(recompile_limit=64, fail_on_recompile_limit_hit=True):
        return _compiled_runs(models, ids, sizes, clock)


def _compiled_runs(models: dict[str, nn.Module], ids: torch.Tensor, sizes: Sizes, clock: str) -> Compiled:
    seconds, same, runs = {}, {}, {EAGER_BASE: lambda m=models["base model"]: greedy(m, ids, sizes.new_tokens)}
    for name, model in models.items():
        start = time.perf_counter()
        want = greedy(model, ids, sizes.new_tokens)
        eager_s = time.perf_counter() - start
        fast = torch.compile(model, dynamic=True)
        start = time.perf_counter()
        got = greedy(fast, ids, sizes.new_tokens)
        seconds[name], same[name] = time.perf_counter() - start - eager_s, torch.equal(got, want)
        runs[name] = lambda fast=fast: greedy(fast, ids, sizes.new_tokens)
        print(f"compiled {name} in {seconds[name]:.0f} s, same tokens: {same[name]}", file=sys.stderr)
    return Compiled(seconds, same, interleaved(runs, "base model", sizes.decode_rounds, warmup=1, clock=clock))


# --- FLOP limits --------------------------------------------------------------------------------


def layer_sizes(config: transformers.PretrainedConfig) -> dict[str, tuple[int, int]]:
    d, ffn = config.hidden_size, config.intermediate_size
    kv = d // config.num_attention_heads * config.num_key_value_heads
    return dict(
        q_proj=(d, d), k_proj=(d, kv), v_proj=(d, kv), o_proj=(d, d), gate_proj=(d, ffn), up_proj=(d, ffn),
        down_proj=(ffn, d),
    )  # fmt: skip


def flop_limit(config, matrices: tuple[str, ...], filters: bool, seq: int, training: bool, rank: int = RANK) -> float:
    """FLOPs per token with adapters over the base's (training: the floor's, whose weights are
    frozen: forward and the input's gradient, `2x` and `4x` the weights' products; LoRA adds
    `6 r (in + out)` per matrix, a filter `2 d (5 r + 6)`; decoding: forward alone, LoRA
    `2 r (in + out)`, a filter `d (4 r + 5)`). Attention `4 seq d` forward; the lm_head `2 d V`."""
    sizes, d = layer_sizes(config), config.hidden_size
    dense = sum(2 * i * o for i, o in sizes.values()) + 4 * seq * d
    lm_head = 2 * d * config.vocab_size
    per_matrix = (6 if training else 2) * rank
    filter_flops = 2 * d * (5 * rank + 6) if training else d * (4 * rank + 5)
    extra = sum(per_matrix * sum(sizes[m]) for m in matrices) + filters * filter_flops
    layers = config.num_hidden_layers
    base = (3 if training else 1) * (layers * dense + lm_head)  # forward, then backward to the input (2x)
    return 1 + layers * extra / base


# --- peak memory, in a fresh process ------------------------------------------------------------


def peak_memory(name: str, checkpointing: bool, sizes: Sizes) -> dict[str, float]:
    """The most resident memory (MiB) two steps add over the model alone (`VmHWM`, reset through
    /proc/self/clear_refs once the model is built, minus `VmRSS` then): activations, gradients,
    the optimizer's state and the loss. Counted from the first step on, as glibc keeps a freed heap
    resident: after a warm-up step, the step's own peak would be hidden in what is held."""
    from cases import rss_kib

    model = training_models(base_model(sizes)[0], copied=False)[name]()  # no copy: nothing freed before the steps
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (sizes.batch, sizes.seq), generator=g)
    step = training_step(model, ids, checkpointing)
    before, _ = rss_kib()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return {"peak_mib": float("nan")}
    step()
    step()
    return {"peak_mib": (rss_kib()[1] - before) / 1024}


def peaks(sizes: Sizes, threads: int, quick: bool) -> dict[tuple[str, bool], float]:
    names = [LORA7, TRF] + [PEFT7] * installed("peft")
    found = {}
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    for name in names:
        for checkpointing in (False, True):
            command = [sys.executable, __file__, "--peak", name, "--threads", str(threads)]
            command += ["--checkpointing"] * checkpointing + ["--quick"] * quick
            out = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
            found[name, checkpointing] = json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"]
    return found


# --- the report ---------------------------------------------------------------------------------


def ratio_cell(t: Timing) -> str:
    lo, hi = t.ratio_iqr
    return f"{t.ratio:.3f}x | {lo:.3f}–{hi:.3f}"


def per_round(a: Timing, b: Timing, fn: Callable[[float, float], float]) -> tuple[float, ...]:
    """`fn` of the two methods' times in each round."""
    return tuple(fn(x, y) for x, y in zip(a.times, b.times))


def spread(values: tuple[float, ...], fmt: str = "{:.3f}") -> str:
    lo, hi = quartiles(values)
    return f"{fmt.format(statistics.median(values))} ({fmt.format(lo)}–{fmt.format(hi)})"


def report(
    model_name: str,
    config,
    sizes: Sizes,
    threads: int,
    clock: str,
    train: dict[str, Timing],
    share_of_layer: Timing | None,
    memory: dict[tuple[str, bool], float],
    decode: dict[int, dict[str, Timing]],
    form_ms: float,
    per_filter_call: dict[str, tuple[float, ...]],
    compiled: Compiled | None,
    load: tuple[float, float],
) -> list[str]:
    libs = ", ".join(f"{p} {version(p)}" if installed(p) else f"{p} not installed" for p in ("transformers", "peft"))
    lines = [
        BEGIN,
        "## The LLM workload: fine-tuning and decoding a LLaMA-architecture model",
        "",
        f"Generated by `benchmarks/llm.py` on {datetime.date.today().isoformat()}: {model_name}; {cpu_model()}, "
        f"{threads} thread{'s' * (threads != 1)}, {clock} time, float32, torch {torch.__version__}, {libs}. "
        f"Machine load (1-minute load average) {load[0]:.1f} at the start and {load[1]:.1f} at the end of the run, "
        f"on {os.cpu_count()} "
        "CPUs: above that, other processes shared the cores, and single rounds are noisy.",
        "",
        "Each table is one interleaved run: every method once per round, the order rotating, after a warm-up call; "
        "a figure is the median over rounds of the method's time over the baseline's in the same round, p25–p75 "
        "their spread. Adapters are rank 8, alpha 16, with non-zero `B` (as after training); LoRA-7 is LoRA on "
        "q, k, v, o, gate, up, down of every layer; LoRATRF is LoRA on o, up, down plus a task-aware filter on "
        "each of the 30 decoder layers' outputs. PEFT's layers are called through the model they wrap, as "
        "loratrf's are. The FLOP limit is the method's FLOPs over the baseline's (`flop_limit` in "
        "`benchmarks/llm.py`): what the arithmetic alone allows.",
        "",
    ]
    goals = ["### Goals", "", "| goal | measured (median, p25–p75) | FLOP limit | met |", "|---|---|---|---|"]
    if train:
        floor = train[FLOOR]
        lines += [
            f"### Fine-tuning step: batch {sizes.batch} x {sizes.seq} tokens, AdamW, r={RANK}, "
            f"{sizes.train_rounds} interleaved rounds",
            "",
            f"Baseline: {FLOOR} ({1e3 * floor.median:.0f} ms).",
            "",
            "| method | time (median) | vs floor (median) | p25–p75 | FLOP limit |",
            "|---|---|---|---|---|",
        ]
        limits = {
            LORA7: flop_limit(config, PROJECTIONS, False, sizes.seq, True),
            PEFT7: flop_limit(config, PROJECTIONS, False, sizes.seq, True),
            OUD_NAME: flop_limit(config, ("o_proj", "up_proj", "down_proj"), False, sizes.seq, True),
            PEFT_OUD: flop_limit(config, ("o_proj", "up_proj", "down_proj"), False, sizes.seq, True),
            TRF: flop_limit(config, ("o_proj", "up_proj", "down_proj"), True, sizes.seq, True),
        }
        for name, t in train.items():
            limit = f"{limits[name]:.3f}x" if name in limits else ""
            lines.append(f"| {name} | {1e3 * t.median:.0f} ms | {ratio_cell(t)} | {limit} |")
        share = per_round(train[TRF], train[OUD_NAME], lambda trf, oud: 100 * (trf - oud) / trf)
        lines += ["", f"The filters' share of the LoRATRF step, `(LoRATRF − LoRA o,up,down) / LoRATRF` per round: "
                  f"{spread(share, '{:.1f}')} %."]  # fmt: skip
        if share_of_layer is not None:
            lo, hi = share_of_layer.ratio_iqr
            lines += ["", f"One filter's forward + backward alone is {100 * share_of_layer.ratio:.2f} % "
                      f"({100 * lo:.2f}–{100 * hi:.2f}) of its decoder layer's (LoRA on o, up, down), on the same "
                      f"`[{sizes.batch}, {sizes.seq}, {config.hidden_size}]` hidden states, in process CPU time on "
                      "one thread "
                      f"({2 * sizes.train_rounds + 1} interleaved rounds): an upper bound on the 30 filters' share "
                      "of the step, which also holds the lm_head, the loss and the optimizer."]  # fmt: skip
        r7 = train[LORA7]
        goals.append(
            f"| step: LoRA-7 <= 1.10x the floor | {r7.ratio:.3f}x ({r7.ratio_iqr[0]:.3f}–{r7.ratio_iqr[1]:.3f}) "
            f"| {limits[LORA7]:.3f}x | {'yes' if r7.ratio <= 1.10 else 'no'} |"
        )
        if PEFT7 in train:  # from the medians: a round's own overheads can be near zero, its quotient anything
            over = (r7.ratio - 1) / (train[PEFT7].ratio - 1)
            goals.append(
                f"| step: LoRA-7's overhead <= half of PEFT's | {over:.2f} of PEFT's "
                f"({r7.ratio:.3f}x vs {train[PEFT7].ratio:.3f}x the floor) | | {'yes' if over <= 0.5 else 'no'} |"
            )
        t = train[TRF]
        goals.append(
            f"| step: LoRATRF (o,up,down + filters) <= 1.08x the floor | {t.ratio:.3f}x "
            f"({t.ratio_iqr[0]:.3f}–{t.ratio_iqr[1]:.3f}) | {limits[TRF]:.3f}x | "
            f"{'yes' if t.ratio <= 1.08 else 'no'} |"
        )
        alone = "" if share_of_layer is None else f"; a filter alone {100 * share_of_layer.ratio:.2f} % of its layer"
        goals.append(
            f"| step: the filters' share <= 3 % | {spread(share, '{:.1f}')} %{alone} | "
            f"{100 * (1 - limits[OUD_NAME] / limits[TRF]):.1f} % | {'yes' if statistics.median(share) <= 3 else 'no'} |"
        )
        lines.append("")
    if memory:
        lines += [
            "### Peak memory of the step (MiB that two steps add over the model alone; a fresh process each)",
            "",
            "| method | without checkpointing | with gradient checkpointing |",
            "|---|---|---|",
        ]
        for name in dict.fromkeys(n for n, _ in memory):
            lines.append(f"| {name} | {memory[name, False]:.0f} MiB | {memory[name, True]:.0f} MiB |")
        lines.append("")
    if decode:
        batches = list(decode)
        lines += [
            f"### Greedy decoding with the KV cache: a {sizes.prompt}-token prompt, {sizes.new_tokens} new tokens, "
            f"{sizes.decode_rounds} interleaved rounds",
            "",
            "Baseline: the base model. *Cached effective weights*: inside `loratrf.cache_effective_weights(model)`, "
            f"held for the whole run as an evaluation loop would hold it; forming LoRA-7's once took {form_ms:.0f} ms "
            "(the first forward inside the block, less the second).",
            "",
            "| method | " + " | ".join(f"batch {b}: time | vs base | p25–p75" for b in batches) + " |",
            "|---|" + "---|---|---|" * len(batches),
        ]
        for name in decode[batches[0]]:
            cells = [f"{1e3 * decode[b][name].median:.0f} ms | {ratio_cell(decode[b][name])}" for b in batches]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lora_limit = flop_limit(config, PROJECTIONS, False, sizes.prompt, False)
        trf_limit = flop_limit(config, ("o_proj", "up_proj", "down_proj"), True, sizes.prompt, False)
        oud_limit = flop_limit(config, ("o_proj", "up_proj", "down_proj"), False, sizes.prompt, False)
        merged_limit = 1 + trf_limit - oud_limit
        limits = f"LoRA-7 {lora_limit:.3f}x, LoRATRF unmerged {trf_limit:.3f}x, merged {merged_limit:.3f}x"
        lines += ["", f"FLOP limits: {limits}.", ""]
        if per_filter_call:
            rounds = len(per_filter_call["the filter"])
            lines += [
                "Per filter call inside batch-1 decoding of the merged LoRATRF model, the time over decoding with "
                f"every filter replaced by the identity ({rounds} interleaved rounds, median and p25–p75, µs): the "
                f"filter {spread(per_filter_call['the filter'], '{:.0f}')}; one elementwise op in its place (`h + 0`) "
                f"{spread(per_filter_call['one elementwise op'], '{:.0f}')}.",
                "",
            ]
        for b in batches:
            for name, bound, limit in (
                (LORA7 + " unmerged", 1.15, lora_limit),
                (LORA7 + " unmerged" + CACHED, 1.15, lora_limit),
                (TRF + ", unmerged", 1.15, trf_limit),
                (TRF + ", unmerged" + CACHED, 1.15, trf_limit),
                (TRF + MERGED, 1.05, merged_limit),
                (TRF + MERGED + CACHED, 1.05, merged_limit),
            ):
                t = decode[b][name]
                peft = decode[b].get(PEFT7 + " unmerged")
                beside = f"; PEFT LoRA-7 {peft.ratio:.3f}x" if peft is not None else ""
                goals.append(
                    f"| decoding, batch {b}: {name} <= {bound}x the base | {t.ratio:.3f}x "
                    f"({t.ratio_iqr[0]:.3f}–{t.ratio_iqr[1]:.3f}){beside} | {limit:.3f}x | "
                    f"{'yes' if t.ratio <= bound else 'no'} |"
                )
    if compiled:
        section, met = compiled_section(compiled, sizes)
        lines += section
        goals += met
    return lines + goals + ["", END, ""]


def compiled_section(compiled: Compiled, sizes: Sizes) -> tuple[list[str], list[str]]:
    """The compiled decoding table, and its rows of the goals table."""
    lines = [
        f"### Greedy decoding, compiled: `torch.compile(model, dynamic=True)` (inductor), batch 1, a {sizes.prompt}-"
        f"token prompt, {sizes.new_tokens} new tokens, {sizes.decode_rounds} interleaved rounds",
        "",
        "Baseline: the compiled base model. Compiling: the first compiled run, less an eager run of the same model.",
        "",
        "| method | time | vs compiled base | p25–p75 | compiling | the eager model's tokens |",
        "|---|---|---|---|---|---|",
    ]
    for name, t in compiled.timings.items():
        made = f"{compiled.seconds[name]:.0f} s" if name in compiled.seconds else ""
        same = {True: "yes", False: "no", None: ""}[compiled.same_tokens.get(name)]
        lines.append(f"| {name} | {1e3 * t.median:.0f} ms | {ratio_cell(t)} | {made} | {same} |")
    lines.append("")
    goals = []
    for name, bound in ((LORA7 + " unmerged", 1.15), (TRF + ", unmerged", 1.15), (TRF + MERGED, 1.05)):
        t = compiled.timings[name]
        goals.append(
            f"| decoding compiled, batch 1: {name} <= {bound}x the compiled base | {t.ratio:.3f}x "
            f"({t.ratio_iqr[0]:.3f}–{t.ratio_iqr[1]:.3f}) | | {'yes' if t.ratio <= bound else 'no'} |"
        )
    return lines, goals


def insert(section: list[str], path: Path) -> None:
    """Put `section` below the page's title, replacing an earlier one."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    text = re.sub(rf"{re.escape(BEGIN)}.*?{re.escape(END)}\n*", "", text, flags=re.S)
    title, _, rest = text.partition("\n")
    path.write_text("\n".join([title, "", *section, rest.lstrip("\n")]))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 small layers, 2 rounds: checks that everything runs")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--clock", choices=["wall", "cpu"], default="wall", help="cpu: process CPU time (--threads 1, busy machine)"
    )
    parser.add_argument("--train-rounds", type=int)
    parser.add_argument("--decode-rounds", type=int)
    parser.add_argument("--decode-batches", type=int, nargs="*", help="decoding batch sizes (default 1 16)")
    parser.add_argument("--new-tokens", type=int, help="tokens generated per decoding run (default 32)")
    parser.add_argument(
        "--only", nargs="*", choices=["train", "memory", "decode", "compile"], help="run only these parts"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument("--notes", default="", help="a paragraph to put below the section's heading")
    parser.add_argument("--peak", help=argparse.SUPPRESS)  # internal: one peak-memory case, in this process
    parser.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", module="peft|transformers")
    sizes = QUICK if args.quick else Sizes()
    if args.peak:
        print(json.dumps(peak_memory(args.peak, args.checkpointing, sizes)))
        return
    sizes.train_rounds = args.train_rounds or sizes.train_rounds
    sizes.decode_rounds = args.decode_rounds or sizes.decode_rounds
    sizes.decode_batches = tuple(args.decode_batches or sizes.decode_batches)
    sizes.new_tokens = args.new_tokens or sizes.new_tokens
    parts = set(args.only or ["train", "memory", "decode", "compile"])
    load_start = os.getloadavg()[0]
    base, model_name = base_model(sizes)
    config = base.config
    vocab = config.vocab_size
    train, memory, decode, form_ms, share, per_call, compiled = {}, {}, {}, float("nan"), None, {}, None

    def write() -> None:  # after each part, so that an interrupted run keeps what it measured
        load = (load_start, os.getloadavg()[0])
        found = report(
            model_name, config, sizes, args.threads, args.clock, train, share, memory, decode, form_ms, per_call,
            compiled, load,
        )  # fmt: skip
        insert(found[:3] + ([args.notes, ""] if args.notes else []) + found[3:], args.out)

    if "train" in parts:
        ids = torch.randint(0, vocab, (sizes.batch, sizes.seq), generator=torch.Generator().manual_seed(0))
        steps = {name: training_step(make(), ids) for name, make in training_models(base).items()}
        train = interleaved(steps, FLOOR, sizes.train_rounds, warmup=1, clock=args.clock)
        del steps
        share = filter_share(base, sizes, 2 * sizes.train_rounds + 1)
        ratios = ", ".join(f"{name}: {t.ratio:.3f}x" for name, t in train.items())
        print(f"training step done: {ratios}; a filter {100 * share.ratio:.2f} % of its layer", file=sys.stderr)
        write()
    if "memory" in parts:
        memory = peaks(sizes, args.threads, args.quick)
        print(f"peak memory done: {memory}", file=sys.stderr)
        write()
    if "decode" in parts:
        models = decoding_models(base)
        form_ms = forming_time(models[LORA7 + " unmerged" + CACHED], vocab)
        with contextlib.ExitStack() as stack:
            for name, model in models.items():
                if name.endswith(CACHED):
                    stack.enter_context(loratrf.cache_effective_weights(model))
            for b in sizes.decode_batches:
                g = torch.Generator().manual_seed(b)
                ids = torch.randint(0, vocab, (b, sizes.prompt), generator=g)
                runs = {name: (lambda m=m: greedy(m, ids, sizes.new_tokens)) for name, m in models.items()}
                decode[b] = interleaved(runs, "base model", sizes.decode_rounds, warmup=1, clock=args.clock)
                ratios = ", ".join(f"{name}: {t.ratio:.3f}x" for name, t in decode[b].items())
                print(f"decoding at batch {b} done: {ratios}", file=sys.stderr)
                write()
        per_call = filter_call_cost(models[TRF + MERGED], sizes, vocab, args.clock)
        del models
        write()
    if "compile" in parts:
        compiled = compiled_decoding(base, sizes, vocab, args.clock)
    write()
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
