"""scripts/bench_extract.py with continuations (``--gen-tokens``), on a saved tiny model:
the per-pair loop (Hugging Face ``generate`` per prompt) and promptshift produce the same
greedy tokens for the check prompts, each mode's whole process is timed, and promptshift's
decode work is counted for pricing against the matmul peak."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import REPO, tiny_llama, write_sweep

NEW = 5


def test_bench_extract_with_continuations(tmp_path, tok):
    model_dir = tmp_path / "m"
    model = tiny_llama(tok, n_layers=2, seed=3)
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    sw = write_sweep(tmp_path / "s.yaml", model=str(model_dir))
    out = tmp_path / "b.json"
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_extract.py"), "--sweep", str(sw),
                        "--max-user", "2", "--max-system", "2", "--gen-tokens", str(NEW), "--modes", "loop,promptshift",
                        "--tmp", str(tmp_path), "--json", str(out)],
                       capture_output=True, text=True, cwd=REPO, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())["results"]
    loop, ps = res["loop"], res["promptshift"]
    assert "error" not in loop and "error" not in ps, (loop, ps)
    # the check prompts (the first pair's variant and baseline, the plan's last prompt)
    # continue with the same tokens under HF generate, one prompt at a time, and promptshift
    assert loop["gen_equal"] == [3, 3], loop["gen_equal"]
    assert "continuations equal to promptshift's: 3/3" in r.stdout
    # 2 variants x 2 user prompts + 2 baselines = 6 rows, each
    # through at most NEW - 1 decode steps (the first token comes from the prompt pass)
    assert 0 < ps["decode_rows"] <= 6 * (NEW - 1)
    assert ps["decode_keys"] > ps["decode_rows"] and 0 < ps["decode_seconds"] < ps["seconds"]
    assert 0 < ps["decode_mfu"] and "promptshift decode:" in r.stdout
    assert ps["process_seconds"] > ps["seconds"] and loop["process_seconds"] > loop["seconds"]
