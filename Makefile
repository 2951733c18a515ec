# jlora: two commands do everything on a fresh machine — `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test bench lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,examples]'
	touch $(STAMP)

demo: install
	$(BIN)/python examples/finetune_mlp.py

test: install
	$(BIN)/python -m pytest

bench: install
	$(BIN)/python benchmarks/step.py

lint: install
	$(BIN)/ruff check jlora tests benchmarks examples
	$(BIN)/ruff format --check jlora tests benchmarks examples

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build *.egg-info
