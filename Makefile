# Two commands: `make demo` and `make test`. Both set up .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup lint test demo bench clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	# torch==2.13.0 is the CPU build on disk here; keep any torch that is already installed.
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test]"
	# declared torchvision dependencies that are never imported: install without resolving them
	$(BIN)/pip install -q --no-deps grad-cam==1.5.7 ttach==0.0.3 deepbet==1.0.2
	touch $(STAMP)

setup: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check src tests bench

test: lint
	$(BIN)/python -m pytest

demo: $(STAMP)
	$(BIN)/medexplain demo --out demo_out

bench: $(STAMP)
	$(BIN)/python bench/run_all.py

clean:
	rm -rf $(VENV) demo_out .pytest_cache
