"""`scripts/gpu_check.sh --dry-run`: the prepared GPU check's every step on the CPU with tiny
models, so that the command a GPU session runs cannot rot between the rare GPU runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import REPO

# rows every dry run must have; the gpu tests add one row each
STEPS = ("random-weight models built", "extraction benchmark: promptshift", "extraction benchmark: loop",
         "matmul peak (same run)", "causal benchmark")
GPU_TESTS = ("test_low_precision_matches_float32[llama-3.2-1b-bfloat16]",
             "test_low_precision_matches_float32[gemma-3-1b-float16]",
             "test_low_precision_matches_float32[smollm2-135m-bfloat16]",
             "test_float16_storage_overflow_is_a_clear_error", "test_out_of_memory_halves_the_batch",
             "test_packed_padded_and_alone_agree[llama-3.2-1b]", "test_packed_padded_and_alone_agree[gemma-3-1b]",
             "test_one_process_per_device", "test_model_split_over_devices", "test_auto_split_spreads_over_gpus")


def test_gpu_check_dry_run(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    env.pop("PROMPTSHIFT_GPU_CHECK", None)
    env.pop("PROMPTSHIFT_GPU_CHECK_MODELS", None)
    # a generous deadline: CI machines are slow and shared; on a GPU the default is 8 minutes
    r = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--dry-run", "--out", str(out),
                        "--deadline", "900"], cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    table = (out / "gpu_check.md").read_text() if (out / "gpu_check.md").exists() else ""
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:] + table
    rows = {row["check"]: row for row in json.loads((out / "gpu_check.json").read_text())["rows"]}
    assert set(rows) == set(STEPS) | set(GPU_TESTS), sorted(rows)
    # on a CPU-only machine only auto-split (several GPUs) may be skipped; everything else
    # ran and passed, with its numbers
    skipped = {k for k, v in rows.items() if v["result"] == "SKIP"}
    assert skipped <= {"test_auto_split_spreads_over_gpus"}, rows
    assert all(rows[k]["result"] == "PASS" for k in set(rows) - skipped), rows
    assert "bound" in rows["test_out_of_memory_halves_the_batch"]["numbers"]
    assert "MFU" in rows["extraction benchmark: promptshift"]["numbers"]
    assert "float32 on cpu" in rows["matmul peak (same run)"]["numbers"]
    assert "promptshift: 2 pairs x " in rows["causal benchmark"]["numbers"]  # the dry run's CAUSAL_ARGS
    # one table, printed at the end and written to the output folder
    assert table.strip().splitlines()[-1] in r.stdout
    assert "dry run (CPU, tiny models)" in table
