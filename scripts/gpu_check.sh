#!/usr/bin/env bash
# The prepared GPU check: the `gpu` tests, the extraction benchmark (MFU against a bf16 matmul
# measured in the same run) and the causal benchmark, on random-weight models with real shapes,
# with no model hub, in at most 8 minutes on one GPU; one summary table at the end, also
# written to OUT/gpu_check.md. Details: scripts/gpu_check.py, docs/BENCHMARKS.md ("GPU").
#
#   scripts/gpu_check.sh [--out DIR]             # on a machine with a CUDA GPU
#   scripts/gpu_check.sh --dry-run [--out DIR]   # the same steps on the CPU, tiny models (<1 min)
#   scripts/gpu_check.sh --prepare DIR           # on a machine with the package index: collect the
#                                                # tokenizer and wheels an offline GPU machine lacks
#   scripts/gpu_check.sh --bundle DIR [--out D]  # on the offline GPU machine, with that DIR
#
# Python: $PYTHON, else .venv/bin/python, else python3 (e.g. a GPU image's own PyTorch).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --bundle)
      bundle="$(cd "$2" && pwd)"; shift 2
      if compgen -G "$bundle/wheels/*.whl" >/dev/null; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --disable-pip-version-check --upgrade \
          --target "$bundle/site" "$bundle"/wheels/*.whl
        export PYTHONPATH="$bundle/site${PYTHONPATH:+:$PYTHONPATH}"
      fi
      [ -d "$bundle/tokenizer" ] && args+=(--tokenizer "$bundle/tokenizer")
      ;;
    *) args+=("$1"); shift ;;
  esac
done
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# the script keeps its own deadline and writes its table as it goes; this is only a backstop
exec timeout --signal=TERM --kill-after=10 600 "$PY" scripts/gpu_check.py ${args[@]+"${args[@]}"}
