# Two commands: `make demo` and `make test`. Both set up .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# nnU-Net v2 (the nnunet extra): nnunetv2 and its network package go in with --no-deps (docs/nnunet.md)
NNUNET_NODEPS := nnunetv2==2.8.1 "dynamic-network-architectures>=0.4.4,<0.5"
NNCHECK := build/nnunet-check-venv

.PHONY: setup lint test demo bench clean check-nnunet-install

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	# torch==2.13.0 is the CPU build on disk here; keep any torch that is already installed.
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test,nnunet]"
	# declared torchvision dependencies that are never imported: install without resolving them
	$(BIN)/pip install -q --no-deps grad-cam==1.5.7 ttach==0.0.3 deepbet==1.0.2
	$(BIN)/pip install -q --no-deps $(NNUNET_NODEPS)
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

# Proves in a throwaway venv that the nnunet extra + the --no-deps pair keep torch 2.13.0+cpu and import
# nnUNetPredictor without timm or torchvision (not part of `make test`).
check-nnunet-install:
	rm -rf $(NNCHECK)
	$(PY) -m venv $(NNCHECK)
	$(NNCHECK)/bin/pip install -q torch==2.13.0
	$(NNCHECK)/bin/pip install -q ".[nnunet]"
	$(NNCHECK)/bin/pip install -q --no-deps $(NNUNET_NODEPS)
	$(NNCHECK)/bin/python -c "import sys, torch; from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor; \
	bad = {'timm', 'torchvision'} & set(sys.modules); assert torch.__version__ == '2.13.0+cpu' and not bad, (torch.__version__, bad); \
	print('nnunet extra ok: torch', torch.__version__, '- timm and torchvision not loaded')"
	rm -rf $(NNCHECK)

clean:
	rm -rf $(VENV) demo_out .pytest_cache
