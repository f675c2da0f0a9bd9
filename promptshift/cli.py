"""The `promptshift` command line. Each command is a thin shell over one stage's Python
entry point; mistakes in the input end as one-line errors (exit code 2), not tracebacks."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from promptshift.errors import PromptShiftError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Explain why a system prompt changes what a chat model does.")

SweepArg = typer.Argument(None, help="sweep YAML, JSON prompt file, or built-in suite name (default: default)")

# Options that several commands share, each defined once (same name, type and help everywhere).
Model = Annotated[Optional[str], typer.Option(help="model: HF id, local dir or .gguf (default: the sweep's, else "
                                              "the embedded SmolLM2-135M-Instruct)")]
Keep = Annotated[Optional[str], typer.Option(help="positions to keep: last, suffix or all")]
ChatTemplate = Annotated[Optional[str], typer.Option(help="Jinja chat template file for models without one")]
TrustRemoteCode = Annotated[bool, typer.Option(help="allow the model repository's own code")]
AllowPickle = Annotated[bool, typer.Option(help="allow pickled .bin weights (they can run code)")]
Device = Annotated[Optional[str], typer.Option(help="cpu, cuda, cuda:1 ..., or auto-split to spread a model over "
                                               "all GPUs (default: auto)")]
Dtype = Annotated[Optional[str], typer.Option(help="compute dtype: auto, float32, float16, bfloat16")]
Progress = Annotated[bool, typer.Option(help="show progress bars")]
Overwrite = Annotated[bool, typer.Option(help="replace a store that holds a different plan")]
Baseline = Annotated[Optional[str], typer.Option(
    help="baseline condition: no_system_turn, empty_system or a system prompt's name (default: the sweep's; "
         "no_system_turn for a JSON prompt file, empty_system for YAML)")]
Workers = Annotated[Optional[int], typer.Option(help="local dask workers for metrics (default 1)")]


def _sweep_overrides(model, keep, storage_dtype, chat_template, trust_remote_code, max_new_tokens=None,
                     baseline=None):
    return dict(model=model, keep=keep, storage_dtype=storage_dtype, chat_template=chat_template,
                trust_remote_code=True if trust_remote_code else None, max_new_tokens=max_new_tokens,
                baseline=baseline)


@app.command()
def suites():
    """List the built-in prompt suites and sweeps."""
    from promptshift.sweep.config import describe_suites

    for line in describe_suites():
        typer.echo(line)


@app.command()
def plan(
    sweep: Optional[str] = SweepArg,
    model: Model = None,
    keep: Keep = None,
    shards: int = typer.Option(1, help="show how the blocks split into this many shards"),
    chat_template: ChatTemplate = None,
    trust_remote_code: TrustRemoteCode = False,
    out: Optional[Path] = typer.Option(None, help="also write the plan as JSON here"),
    baseline: Baseline = None,
):
    """Render every prompt, pair and align them, and print counts and store-size estimates."""
    from promptshift.sweep.config import load_sweep
    from promptshift.sweep.plan import build_plan, load_plan_inputs

    s = load_sweep(sweep, **_sweep_overrides(model, keep, None, chat_template, trust_remote_code,
                                             baseline=baseline))
    tok, dims = load_plan_inputs(s)
    p = build_plan(s, tok, dims)
    typer.echo(p.summary())
    if shards > 1:
        for i in range(shards):
            bl = p.shard_blocks(i, shards)
            typer.echo(f"  shard {i}/{shards}: blocks {bl[0] if bl else '-'}..{bl[-1] if bl else '-'} ({len(bl)})")
    if out:
        out.write_text(json.dumps(p.to_json(), indent=1))
        typer.echo(f"plan written to {out}")


@app.command()
def extract(
    sweep: Optional[str] = SweepArg,
    store: Path = typer.Option(..., help="store path (zarr directory, or .h5 file with --format hdf5)"),
    shard: Optional[str] = typer.Option(None, help="I/N: fill only shard I of N (0-based)"),
    keep: Keep = None,
    format: str = typer.Option("zarr", help="zarr or hdf5"),
    overwrite: Overwrite = False,
    model: Model = None,
    device: Device = None,
    devices: Optional[str] = typer.Option(None, help="comma-separated devices: one process per device, each "
                                          "filling one shard (e.g. cuda:0,cuda:1)"),
    dtype: Dtype = None,
    storage_dtype: Optional[str] = typer.Option(None, help="float16 (default) or float32 on disk"),
    max_new_tokens: Optional[int] = typer.Option(None, help="greedy continuation length (0 to skip)"),
    prefix_sharing: bool = typer.Option(True, help="compute each shared system prefix once"),
    packing: bool = typer.Option(True, help="run each batch's real tokens as one packed sequence outside "
                                 "attention (models on one device); --no-packing pads every module"),
    chat_template: ChatTemplate = None,
    trust_remote_code: TrustRemoteCode = False,
    allow_pickle: AllowPickle = False,
    progress: Progress = True,
    init_only: bool = typer.Option(False, help="only create the store from the plan"),
    requeue: bool = typer.Option(True, help="under SLURM, requeue this task when stopped by SIGTERM/SIGUSR1"),
    baseline: Baseline = None,
):
    """Run the model over the sweep and fill (this shard of) the activation store."""
    if devices:
        if shard:
            raise typer.BadParameter("--devices makes its own shards; do not combine it with --shard")
        from promptshift.scale.devices import launch_per_device

        code = launch_per_device(devices.split(","), sys.argv[1:])
        if code:
            raise typer.Exit(code)
        return
    from promptshift.extract.worker import ExtractConfig
    from promptshift.extract.worker import fill_shard
    from promptshift.sweep.config import load_sweep

    s = load_sweep(sweep, **_sweep_overrides(model, keep, storage_dtype, chat_template, trust_remote_code,
                                             max_new_tokens, baseline))
    cfg = ExtractConfig(store=str(store), shard=shard, format=format, overwrite=overwrite, device=device,
                        dtype=dtype, prefix_sharing=prefix_sharing, packing=packing, progress=progress,
                        allow_pickle=allow_pickle, init_only=init_only, requeue=requeue)
    t0 = time.perf_counter()
    st = fill_shard(s, cfg)
    d = st.done()
    typer.echo(f"store {store}: {int(d.sum())}/{d.size} blocks done ({time.perf_counter() - t0:.1f} s)")


@app.command()
def info(store: Path = typer.Argument(..., help="store path")):
    """Summarise a store: plan, provenance, completeness, sizes."""
    from promptshift.store import open_store
    from promptshift.store.verify import describe_store

    typer.echo(describe_store(open_store(store)))


@app.command()
def verify(store: Path = typer.Argument(..., help="store path"),
           tolerance: float = typer.Option(1e-3, help="largest relative batched-vs-alone difference allowed")):
    """Check completeness, schema, NaN/inf and the self-checks; exit 1 on any problem."""
    from promptshift.store.verify import verify_store

    problems = verify_store(store, tolerance=tolerance)
    if problems:
        for p in problems:
            typer.echo(f"PROBLEM: {p}", err=True)
        raise typer.Exit(1)
    typer.echo(f"{store}: OK")


@app.command()
def export(store: Path = typer.Argument(..., help="zarr store"), to: Path = typer.Option(..., help="output .h5 file")):
    """Copy a store into another backend (zarr -> HDF5 or back)."""
    from promptshift.store.verify import export_store

    export_store(store, to)
    typer.echo(f"exported {store} -> {to}")


@app.command()
def metrics(
    store: Path = typer.Argument(..., help="store path"),
    out: Path = typer.Option(..., help="results directory"),
    scheduler: Optional[str] = typer.Option(None, help="address of a running dask scheduler (tcp://host:port)"),
    workers: Workers = None,
    slurm_workers: Optional[int] = typer.Option(None, help="start this many dask workers as Slurm jobs"),
    recent_k: int = typer.Option(5, help="\"recent tokens\": attention share of the last K keys of the last "
                                 "query row (attention_layers.recent_mass)"),
    sweep: Optional[str] = typer.Option(None, help="judge replies with this sweep's checks and matchers (same "
                                        "prompts and settings as the store's; default: the store's own)"),
):
    """Compute similarity, attention, output-change and behaviour tables and the analyses from a store."""
    from promptshift import metrics as m

    cluster = None
    if slurm_workers:
        if scheduler:
            raise typer.BadParameter("give either --scheduler or --slurm-workers, not both")
        from promptshift.scale.dask_slurm import start_slurm_cluster

        cluster = start_slurm_cluster(slurm_workers)
        scheduler = cluster.scheduler_address
    try:
        m.compute(str(store), str(out), scheduler=scheduler, workers=workers, recent_k=recent_k, sweep=sweep)
    finally:
        if cluster is not None:
            cluster.close()
    typer.echo(f"results in {out}")


@app.command()
def slurm(
    sweep: str = typer.Argument(..., help="sweep YAML, JSON prompt file or suite name"),
    store: Path = typer.Option(..., help="zarr store path (on a filesystem every node sees)"),
    tasks: int = typer.Option(..., help="number of extract array tasks (fixed for a store)"),
    partition: Optional[str] = typer.Option(None),
    gpus_per_task: Optional[int] = typer.Option(None),
    time_limit: Optional[str] = typer.Option(None, "--time", help="per-task time limit, e.g. 04:00:00"),
    cpus_per_task: Optional[int] = typer.Option(None),
    mem: Optional[str] = typer.Option(None),
    results: Optional[Path] = typer.Option(None, help="results directory (default: next to the store)"),
    setup: str = typer.Option("", help="shell lines to run first in every job (module load ...)"),
    templates: Optional[Path] = typer.Option(None, help="folder of edited *.sbatch templates"),
    extract_args: str = typer.Option("", help="extra arguments for every `promptshift extract`"),
    metrics_args: str = typer.Option("", help="extra arguments for `promptshift metrics`"),
    causal: bool = typer.Option(False, help="run the causal analyses as a job between verify and metrics"),
    causal_args: str = typer.Option("", help="extra arguments for `promptshift causal` (e.g. --users 8)"),
    dry_run: bool = typer.Option(False, help="write and print the scripts and the exact sbatch lines of the "
                                 "chain, submitting nothing"),
):
    """Submit plan -> extract array -> verify -> metrics as a SLURM dependency chain."""
    from promptshift.scale.slurm import SlurmConfig, submit

    cfg = SlurmConfig(sweep=sweep, store=str(store), tasks=tasks, partition=partition, gpus_per_task=gpus_per_task,
                      time=time_limit, cpus_per_task=cpus_per_task, mem=mem,
                      results=str(results) if results else None, setup=setup,
                      templates=str(templates) if templates else None, extract_args=extract_args,
                      metrics_args=metrics_args, causal=causal, causal_args=causal_args)
    submit(cfg, dry_run=dry_run, echo=typer.echo)


@app.command()
def causal(
    sweep: Optional[str] = typer.Argument(None, help="the sweep the store was extracted with (optional: the store "
                                          "holds it; when given, it is checked against the store's)"),
    store: Path = typer.Option(..., help="store made by `extract` (the results are added to it)"),
    analysis: list[str] = typer.Option(["all"], help="patching, knockout, phrases, steering, multiturn, "
                                       "continuation or all (repeat the option for several)"),
    users: Optional[int] = typer.Option(None, help="only N user prompts, spread evenly over the sweep (default: all)"),
    suite: str = typer.Option("multiturn", help="multi-turn suite (name or YAML) for the multiturn analysis"),
    max_new_tokens: int = typer.Option(16, help="reply length for the multi-turn rule check"),
    continuation_tokens: int = typer.Option(16, help="first tokens of each variant's stored reply that the "
                                            "continuation analysis scores"),
    model: Annotated[Optional[str], typer.Option(
        help="load the weights from here (HF id, local dir or .gguf) instead of the store's model; they must be "
             "the same weights (sha256)")] = None,
    device: Device = None,
    dtype: Dtype = None,
    chat_template: ChatTemplate = None,
    trust_remote_code: TrustRemoteCode = False,
    allow_pickle: AllowPickle = False,
    progress: Progress = True,
    skip_done: bool = typer.Option(False, help="skip the analyses already in the store for these user prompts "
                                   "(resume after an interruption)"),
    baseline: Baseline = None,
):
    """Causal analyses (activation patching, system-span knockout, phrase ablation, steering
    vectors, multi-turn decay) with the model, written into the store for `metrics`."""
    from promptshift.causal import CausalConfig, run_causal
    from promptshift.errors import SweepError
    from promptshift.sweep.config import load_sweep

    if sweep is None and (baseline is not None or chat_template is not None):
        raise SweepError("--baseline and --chat-template describe a sweep: give SWEEP with them, or leave them out "
                         "(the store's own sweep is used)")
    s = (load_sweep(sweep, **_sweep_overrides(None, None, None, chat_template, None, baseline=baseline))
         if sweep is not None else None)
    if skip_done:
        from promptshift.causal import missing_analyses
        from promptshift.store import open_store

        wanted = CausalConfig(store=str(store), analyses=tuple(analysis)).analyses
        left = [a for a in missing_analyses(open_store(store), s, users) if a in wanted]
        if not left:
            typer.echo(f"store {store}: {', '.join(wanted)} already done")
            return
        analysis = left
    cfg = CausalConfig(store=str(store), analyses=tuple(analysis), users=users, suite=suite,
                       max_new_tokens=max_new_tokens, continuation_tokens=continuation_tokens, model=model,
                       device=device, dtype=dtype,
                       trust_remote_code=trust_remote_code, allow_pickle=allow_pickle, progress=progress)
    timings = run_causal(s, cfg)
    typer.echo(f"store {store}: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()))


@app.command()
def report(results: Path = typer.Argument(..., help="results directory from `promptshift metrics`"),
           out: Optional[Path] = typer.Option(None, help="HTML file (default RESULTS/report.html)")):
    """Draw the figures and write one self-contained HTML report."""
    from promptshift.report import build_report

    path = build_report(results, out)
    typer.echo(f"report: {path}")


@app.command()
def run(
    sweep: Optional[str] = typer.Option(None, help="sweep YAML, JSON prompt file or suite (default: quick)"),
    model: Model = None,
    out: Path = typer.Option(Path("runs/default"), help="output directory"),
    workers: Workers = None,
    overwrite: Overwrite = False,
    causal: bool = typer.Option(True, help="run the causal analyses (patching, knockout, phrases, steering, "
                                "multi-turn) between extract and metrics"),
    causal_users: Optional[int] = typer.Option(None, help="causal analyses on N user prompts spread evenly over "
                                               "the sweep (default: all)"),
    baseline: Baseline = None,
    keep: Keep = None,
    device: Device = None,
    dtype: Dtype = None,
    chat_template: ChatTemplate = None,
    trust_remote_code: TrustRemoteCode = False,
    progress: Progress = True,
):
    """plan -> extract -> causal -> metrics -> report, in one go."""
    from promptshift.api import run as run_pipeline

    run_pipeline(sweep or "quick", out, model=model, causal=causal, causal_users=causal_users, workers=workers,
                 overwrite=overwrite, baseline=baseline, device=device, dtype=dtype, progress=progress,
                 echo=typer.echo, **{k: v for k, v in _sweep_overrides(None, keep, None, chat_template,
                                                                       trust_remote_code).items()
                                     if v is not None and k != "model"})


# commands that fill a store in resumable steps (blocks, analyses): a rerun continues them
_RESUMABLE = ("extract", "causal", "run")


def main(argv: list[str] | None = None) -> None:
    """The console script. A mistake in the input (a :class:`PromptShiftError`) is one line
    and exit code 2; any other failure (a model's own error, a bug) is one line too, exit
    code 1, naming the exception; ``PROMPTSHIFT_DEBUG=1`` shows its traceback instead."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        app(args=argv, standalone_mode=True)
    except PromptShiftError as e:
        typer.echo(f"error: {_one_line(e)}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted; rerun the same command to resume", err=True)
        sys.exit(130)
    except Exception as e:
        if os.environ.get("PROMPTSHIFT_DEBUG", "") not in ("", "0"):
            raise
        cmd = next((a for a in argv if not a.startswith("-")), "promptshift")
        resume = ("; what finished is kept: rerun the same command to resume (no --overwrite)"
                  if cmd in _RESUMABLE else "")
        typer.echo(f"error: {cmd} failed: {type(e).__name__}: {_one_line(e)}{resume} "
                   "(PROMPTSHIFT_DEBUG=1 shows the traceback)", err=True)
        sys.exit(1)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
