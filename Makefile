# `make test` and `make demo` set up .venv themselves (Python >= 3.10, no torch needed).
# torch is pinned to the CPU build; bring your own with `make TORCH_SPEC=torch==X.Y test`.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip install --quiet --disable-pip-version-check

.PHONY: test demo story bench clean

$(VENV)/.torch:
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(PIP) "$(TORCH_SPEC)"
	touch $@

$(VENV)/.test: $(VENV)/.torch pyproject.toml
	$(PIP) -e ".[test,hf]"
	touch $@

# PEFT, loralib and matplotlib for the side-by-side benchmarks (loratrf's own figures need none)
$(VENV)/.bench: $(VENV)/.torch pyproject.toml
	$(PIP) -e ".[hf,bench]"
	touch $@

test: $(VENV)/.test
	$(BIN)/python -m pytest -q

demo: story

story: $(VENV)/.test
	$(BIN)/python -m loratrf.experiments.story

# writes docs/benchmarks.md and docs/benchmarks.png (a few minutes on 2 cores)
bench: $(VENV)/.bench
	$(BIN)/python benchmarks/run.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis src/*.egg-info
