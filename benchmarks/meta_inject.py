"""Time `loratrf.inject` on a LLaMA-7B-shaped model built on the meta device.

    python benchmarks/meta_inject.py [--repeats 9]

Each repeat builds a fresh `LlamaForCausalLM` (hidden 4096, 32 layers, FFN 11008, vocab 32000)
under `torch.device("meta")` and injects a preset into it. Prints the median and the spread
(min, max) of the inject time, the build time for comparison, the thread count, and the
resident memory the injections added (meta tensors hold no storage, so it should stay near 0).
Needs the `hf` extra (transformers).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch

import loratrf
from loratrf import presets

try:
    import transformers
except ImportError:  # pragma: no cover
    raise SystemExit("this benchmark needs transformers: pip install -e '.[hf]'") from None

LLAMA_7B = dict(
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    max_position_embeddings=2048,
    tie_word_embeddings=False,
)


def rss_mib() -> float:
    """Current resident set size of this process."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def build() -> torch.nn.Module:
    """LLaMA-7B (Touvron et al. 2023) on the meta device: no storage."""
    with torch.device("meta"):
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA_7B))


def measure(config: loratrf.InjectionConfig, repeats: int) -> None:
    build()  # warm-up: imports, lazy initialisation
    builds, injects, grown = [], [], []
    for _ in range(repeats):
        start = time.perf_counter()
        model = build()
        built = time.perf_counter()
        before = rss_mib()
        loratrf.inject(model, **config.to_dict())
        injects.append(time.perf_counter() - built)
        grown.append(rss_mib() - before)
        builds.append(built - start)
        assert all(t.is_meta for t in (*model.parameters(), *model.buffers()))
    counts = loratrf.summary(model)
    ms = lambda xs: f"median {1e3 * statistics.median(xs):7.1f} ms (min {1e3 * min(xs):.1f}, max {1e3 * max(xs):.1f})"
    print(f"  inject: {ms(injects)}")
    print(
        f"  build:  {ms(builds)}   inject/build median ratio {statistics.median(injects) / statistics.median(builds):.2f}"
    )
    print(f"  resident memory added by inject: max {max(grown):.1f} MiB; every tensor is on meta")
    print(f"  LoRA {counts.lora:,}  filters {counts.filter:,}  base {counts.base_total:,}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args(argv)
    transformers.logging.set_verbosity_error()
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads")
    print(f"LLaMA-7B shape on meta, {args.repeats} repeats")
    for name in ("LORATRF_LLAMA", "LORA_LLAMA"):
        print(f"{name}:")
        measure(getattr(presets, name), args.repeats)


if __name__ == "__main__":
    main()
