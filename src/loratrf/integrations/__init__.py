"""Integrations with other libraries, each imported only when used (and needing its extra).

- `loratrf.integrations.trainer`: Hugging Face `transformers.Trainer` checkpoints that hold the
  adapter file instead of the base weights (the `hf` extra).
"""
