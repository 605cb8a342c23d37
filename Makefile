# The two commands of the README's quick start: `make run` (the main job) and `make test`; `make docs` builds the
# documentation site into site/.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
EXTRAS ?= dev

.PHONY: run test install docs benchmark clean-venv

$(BIN)/.installed-$(EXTRAS): setup.cfg pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 10) and "smoothness-lab needs Python >= 3.10")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e '.[$(EXTRAS)]'
	touch $@

install: $(BIN)/.installed-$(EXTRAS)

run: install
	$(BIN)/smoothness-lab run $(ARGS)

test: install
	$(BIN)/python -m pytest $(ARGS)

docs:
	$(MAKE) install EXTRAS=dev,docs
	PYTHONPATH=$(CURDIR) $(BIN)/mkdocs build --strict

benchmark:
	$(MAKE) install EXTRAS=dev,benchmark,ray
	$(BIN)/python benchmarks/bench_smoothness.py
	$(BIN)/python benchmarks/bench_training.py
	$(BIN)/python benchmarks/bench_executors.py

clean-venv:
	rm -rf $(VENV)
