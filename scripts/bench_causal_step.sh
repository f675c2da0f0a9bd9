#!/usr/bin/env bash
# The causal step of `make run`, an old commit against a new one, side by side in one sitting:
# one extraction of the sweep (by the old code, untimed), copied, then `promptshift causal` of
# each checkout on its copy (the same user prompts as `make run`: --causal-users 9), timed as
# whole processes, one after the other; then the two stores' causal results compared array by
# array (scripts/compare_causal.py). Prints the seconds of each, the ratio, and each side's
# per-analysis seconds; the new code's analyses that the old code lacks (continuation) are
# also summed apart, so that the like-for-like ratio can be read too.
#
#   scripts/bench_causal_step.sh                                   # 36c0db1 vs HEAD, quick sweep, 9 users
#   scripts/bench_causal_step.sh --old 36c0db1 --new main --users 9 --work /tmp/bcs
#   scripts/bench_causal_step.sh --sweep tiny.yaml --users 2 --analyses "patching steering"   # a check that it runs
#
# --analyses: a subset of the analyses (default: all of each checkout's, as `make run` runs them).
#
# Python: $PYTHON, else .venv/bin/python of this checkout, else python3 (each checkout's own
# code through PYTHONPATH, the same interpreter and libraries for both). Threads: torch's
# default (all cores) unless OMP_NUM_THREADS is set. Needs git (worktrees of OLD and NEW).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OLD=36c0db1
NEW=HEAD
SWEEP=quick
USERS=9
WORK=/tmp/bench-causal-step
ANALYSES=all
while [ $# -gt 0 ]; do
  case "$1" in
    --old) OLD="$2"; shift 2 ;;
    --new) NEW="$2"; shift 2 ;;
    --sweep) SWEEP="$2"; shift 2 ;;
    --users) USERS="$2"; shift 2 ;;
    --work) WORK="$2"; shift 2 ;;
    --analyses) ANALYSES="$2"; shift 2 ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    *) echo "bench_causal_step.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x "$REPO/.venv/bin/python" ]; then PY="$REPO/.venv/bin/python"; else PY=python3; fi
fi
case "$SWEEP" in */*|*.yaml|*.yml|*.json) SWEEP="$(cd "$(dirname "$SWEEP")" && pwd)/$(basename "$SWEEP")" ;; esac

mkdir -p "$WORK"
WORK="$(cd "$WORK" && pwd)"
checkout() {  # checkout NAME REV: a detached worktree of REV at WORK/NAME (re-pointed if it exists)
  local dir="$WORK/$1" rev
  rev="$(git -C "$REPO" rev-parse --verify "$2^{commit}")"
  if [ -d "$dir" ]; then git -C "$dir" checkout -q --detach "$rev"; else git -C "$REPO" worktree add -q --detach "$dir" "$rev"; fi
  echo "$1: $(git -C "$dir" log -1 --format='%h %s' | cut -c1-100)"
}
checkout old "$OLD"
checkout new "$NEW"

export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
rm -rf "$WORK/old.zarr" "$WORK/new.zarr"
echo "extracting $SWEEP with the old code (not timed) ..."
(cd "$WORK/old" && PYTHONPATH="$WORK/old" "$PY" -m promptshift.cli extract "$SWEEP" --store "$WORK/old.zarr" \
  > "$WORK/extract.log" 2>&1) || { tail -5 "$WORK/extract.log"; exit 1; }
cp -r "$WORK/old.zarr" "$WORK/new.zarr"

declare -A SECS
ANALYSIS_ARGS=()
for a in $ANALYSES; do ANALYSIS_ARGS+=(--analysis "$a"); done
for side in old new; do
  echo "causal step, $side code ..."
  t0=$(date +%s.%N)
  (cd "$WORK/$side" && PYTHONPATH="$WORK/$side" "$PY" -m promptshift.cli causal "$SWEEP" --store "$WORK/$side.zarr" \
    --users "$USERS" "${ANALYSIS_ARGS[@]}" --no-progress > "$WORK/causal-$side.log" 2>&1) || { tail -5 "$WORK/causal-$side.log"; exit 1; }
  t1=$(date +%s.%N)
  SECS[$side]=$("$PY" -c "print(f'{$t1 - $t0:.1f}')")
done

echo
echo "results, old vs new (scripts/compare_causal.py; 'only in one store': analyses the old code lacks):"
(cd "$WORK/new" && PYTHONPATH="$WORK/new" "$PY" scripts/compare_causal.py "$WORK/old.zarr" "$WORK/new.zarr") || true

echo
"$PY" - "$WORK" "${SECS[old]}" "${SECS[new]}" "$SWEEP" "$USERS" <<'PY'
import re, sys
work, old_s, new_s, sweep, users = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), sys.argv[4], sys.argv[5]

def analyses(side):
    """{analysis: seconds} from the line `promptshift causal` ends with: 'store ...: patching 12 s, ...'."""
    text = open(f"{work}/causal-{side}.log").read()
    line = [x for x in text.splitlines() if x.startswith("store ")][-1]
    return {k: float(v) for k, v in re.findall(r"(\w+) ([\d.]+) s", line.split(": ", 1)[1])}

a_old, a_new = analyses("old"), analyses("new")
extra = sum(v for k, v in a_new.items() if k not in a_old)
print(f"causal step of `make run` ({sweep}, --users {users}), whole `promptshift causal` processes "
      "(imports and model load included, the same in both):")
print("| code | seconds | old / new |")
print("|---|---|---|")
print(f"| old | {old_s:.1f} | 1.00 |")
print(f"| new | {new_s:.1f} | {old_s / new_s:.2f} |")
if extra:
    names = ", ".join(k for k in a_new if k not in a_old)
    print(f"| new without {names} ({extra:.0f} s; the old code lacks it) | {new_s - extra:.1f} | "
          f"{old_s / (new_s - extra):.2f} |")
for side, a in (("old", a_old), ("new", a_new)):
    print(f"{side} per analysis: " + ", ".join(f"{k} {v:.0f} s" for k, v in a.items()))
PY
