# `make demo` and `make test` each set up .venv on first use, then run. `make corpus` sets up
# .venv-corpus (torch with torchvision, timm and transformers) and runs the real-model corpus.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CORPUS_VENV := .venv-corpus
CORPUS_PY := $(CORPUS_VENV)/bin/python
CORPUS_STAMP := $(CORPUS_VENV)/.installed

.PHONY: demo test corpus lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0   # the CPU build; pinned so no CUDA wheels are pulled
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/quickstart.py

test: $(STAMP)
	$(PY) -m pytest -q

$(CORPUS_STAMP): pyproject.toml
	test -x $(CORPUS_PY) || $(PYTHON) -m venv $(CORPUS_VENV)
	$(CORPUS_PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(CORPUS_PY) -m pip install -q timm transformers
	$(CORPUS_PY) -m pip install -q -e ".[dev]"
	touch $(CORPUS_STAMP)

# Each model runs in its own process; the table is printed and written to corpus-results.json.
corpus: $(CORPUS_STAMP)
	HF_HUB_OFFLINE=1 $(CORPUS_PY) -m pytest -q -m corpus tests/corpus -p no:cacheprovider -o addopts=""

lint: $(STAMP)
	$(VENV)/bin/ruff check compiler passes codegen models tests examples
	$(VENV)/bin/ruff format --check compiler passes codegen models tests examples

clean:
	rm -rf $(VENV) $(CORPUS_VENV) corpus-results.json build dist *.egg-info .pytest_cache .hypothesis
