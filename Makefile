# Two commands are all the set-up anyone needs: `make demo` and `make test`.
PY ?= python3
# Idle OpenMP threads sleep instead of spinning (a busy 2-core box otherwise slows 50x).
export OMP_WAIT_POLICY ?= PASSIVE
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DIR ?= runs/demo

.PHONY: demo test install lint bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[test,data]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/prunekit example mlp-mnist --out $(DEMO_DIR)/dense.safetensors --overwrite
	$(BIN)/prunekit prune $(DEMO_DIR)/dense.safetensors --data mnist5k \
		--sparsity 0.9 --steps 10 --finetune-epochs 1 --out $(DEMO_DIR)/pruned --overwrite

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python bench/bench_criteria.py

clean:
	rm -rf $(VENV) runs build *.egg-info
