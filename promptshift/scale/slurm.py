"""`promptshift slurm`: write the batch scripts next to the store and submit the chain
plan -> extract array -> verify -> metrics, each stage `afterok` the one before.

Re-running the same command submits only the shards whose blocks are not all done (and
that are not already queued or running), so a pre-empted or cancelled task costs one
command to repair. The number of array tasks is fixed when the chain is first written:
shards are ranges of the plan's blocks, and changing their count between runs would
leave two task numberings pointing at one store.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from string import Template

from promptshift.errors import PromptShiftError, ShardSpecError

STAGES = ("plan", "extract", "verify", "metrics")


class SlurmError(PromptShiftError):
    """sbatch/squeue failed or are missing."""


@dataclass
class SlurmConfig:
    """Options of `promptshift slurm` (saved as ``<store>.slurm/config.json``)."""

    sweep: str
    store: str
    tasks: int
    partition: str | None = None
    gpus_per_task: int | None = None
    time: str | None = None
    cpus_per_task: int | None = None
    mem: str | None = None
    results: str | None = None
    metrics_args: str = ""
    extract_args: str = ""
    causal: bool = False  # add the causal analyses (`promptshift causal`) between verify and metrics
    causal_args: str = ""
    signal_lead: int = 120  # seconds before the time limit SLURM sends USR1
    setup: str = ""  # shell lines run before each step (module load, conda activate, ...)
    templates: str | None = None  # folder with plan/extract/verify/metrics.sbatch to use instead
    sbatch_extra: list[str] = field(default_factory=list)

    def __post_init__(self):
        if not isinstance(self.tasks, int) or self.tasks < 1:
            raise ShardSpecError(f"--tasks must be a positive integer, got {self.tasks!r}")
        self.store = str(Path(self.store).resolve())
        if Path(self.sweep).exists():
            self.sweep = str(Path(self.sweep).resolve())
        self.results = str(Path(self.results).resolve()) if self.results else str(Path(self.store).parent / "results")

    @property
    def workdir(self) -> Path:
        return Path(self.store + ".slurm")


def _template(cfg: SlurmConfig, stage: str) -> Template:
    if cfg.templates:
        path = Path(cfg.templates) / f"{stage}.sbatch"
        if not path.is_file():
            raise SlurmError(f"template {path} does not exist")
        return Template(path.read_text())
    return Template((resources.files("promptshift.scale") / "templates" / f"{stage}.sbatch").read_text())


def render_scripts(cfg: SlurmConfig) -> dict[str, str]:
    opts = []
    if cfg.partition:
        opts.append(f"#SBATCH --partition={cfg.partition}")
    if cfg.time:
        opts.append(f"#SBATCH --time={cfg.time}")
    if cfg.cpus_per_task:
        opts.append(f"#SBATCH --cpus-per-task={cfg.cpus_per_task}")
    if cfg.mem:
        opts.append(f"#SBATCH --mem={cfg.mem}")
    opts += [f"#SBATCH {x}" for x in cfg.sbatch_extra]
    gpu = f"#SBATCH --gpus-per-task={cfg.gpus_per_task}" if cfg.gpus_per_task else ""
    values = dict(
        name="promptshift",
        workdir=str(cfg.workdir),
        sbatch_options="\n".join(opts),
        gpu_options=gpu,
        setup=cfg.setup,
        promptshift=f"{shlex.quote(sys.executable)} -m promptshift.cli",
        sweep=shlex.quote(cfg.sweep),
        store=shlex.quote(cfg.store),
        results=shlex.quote(cfg.results),
        tasks=str(cfg.tasks),
        signal_lead=str(cfg.signal_lead),
        extract_args=cfg.extract_args,
        metrics_args=cfg.metrics_args,
        causal_args=cfg.causal_args,
    )
    out = {}
    for stage in STAGES + (("causal",) if cfg.causal else ()):
        try:
            out[stage] = _template(cfg, stage).substitute(values)
        except (KeyError, ValueError) as e:
            raise SlurmError(f"template {stage}.sbatch uses an unknown or malformed placeholder: {e}") from e
    return out


def _run(cmd: list[str]) -> str:
    if shutil.which(cmd[0]) is None:
        raise SlurmError(f"`{cmd[0]}` not found: is this a SLURM login node? (use --dry-run to see the scripts)")
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise SlurmError(f"{' '.join(cmd)} failed: {r.stderr.strip() or r.stdout.strip()}")
    return r.stdout.strip()


def _active_array_tasks(job_id: str) -> set[int]:
    """Array task ids of ``job_id`` still pending or running."""
    if not job_id or shutil.which("squeue") is None:
        return set()
    r = subprocess.run(["squeue", "-h", "-r", "-j", job_id, "-o", "%K %T"], capture_output=True, text=True)
    active = set()
    for line in r.stdout.split("\n"):
        parts = line.split()
        if len(parts) == 2 and parts[0].isdigit() and parts[1] not in ("COMPLETED", "FAILED", "CANCELLED"):
            active.add(int(parts[0]))
    return active


def pending_shards(cfg: SlurmConfig) -> list[int] | None:
    """Shards whose blocks are not all done; None when the store does not exist yet."""
    from promptshift.store import open_store

    if not Path(cfg.store).exists():
        return None
    st = open_store(cfg.store)
    done = st.done()
    return [i for i in range(cfg.tasks) if not all(done[b] for b in st.plan.shard_blocks(i, cfg.tasks))]


@dataclass
class Step:
    """One ``sbatch`` call of the chain: the stage, its script, its array spec and the stage it
    waits for (``afterok``). ``depends_on`` names a stage of this chain, or a job id already
    in the queue (a previous chain's extract tasks still running)."""

    stage: str
    script: Path
    array: str | None = None
    depends_on: str | None = None

    def argv(self, job_ids: dict[str, str]) -> list[str]:
        """The sbatch command line, with the dependency's job id from ``job_ids``."""
        cmd = ["sbatch", "--parsable"]
        if self.array:
            cmd.append(f"--array={self.array}")
        if self.depends_on:
            cmd.append(f"--dependency=afterok:{job_ids.get(self.depends_on, self.depends_on)}")
        return cmd + [str(self.script)]

    def shell(self) -> str:
        """The command as a shell line that stores the job id in ``$<STAGE>_JOB`` for the
        next line's ``--dependency`` (what ``--dry-run`` prints)."""
        var = {st: f"${{{st.upper()}_JOB}}" for st in (*STAGES, "causal")}
        cmd = " ".join(shlex.quote(a) if not a.startswith("--dependency") else a for a in self.argv(var))
        return f"{self.stage.upper()}_JOB=$({cmd} | cut -d';' -f1)"


def chain(cfg: SlurmConfig, need_plan: bool, shards: list[int], running_extract: str | None = None) -> list[Step]:
    """The sbatch calls of one submission: plan (when the store does not exist yet), the
    extract array over ``shards``, verify, causal (when asked) and metrics, each ``afterok``
    the one before; verify waits for ``running_extract`` (a job id) when no extract task
    is submitted but earlier ones are still queued."""
    wd = cfg.workdir
    steps, dep = [], None
    if need_plan:
        steps.append(Step("plan", wd / "plan.sbatch"))
        dep = "plan"
    if shards:
        steps.append(Step("extract", wd / "extract.sbatch", _array_spec(shards), dep))
        dep = "extract"
    elif running_extract:
        dep = running_extract
    for stage in ("verify", *(("causal",) if cfg.causal else ()), "metrics"):
        steps.append(Step(stage, wd / f"{stage}.sbatch", None, dep))
        dep = stage
    return steps


def submit(cfg: SlurmConfig, dry_run: bool = False, echo=print) -> dict:
    """Write the scripts and submit what is missing. Returns the submitted job ids.

    ``dry_run`` writes the scripts into ``<store>.slurm/`` and prints them and the exact
    ``sbatch`` lines (each keeping its job id in a shell variable the next one's
    ``--dependency`` uses), submitting nothing: paste them into a shell, or adapt them."""
    wd = cfg.workdir
    tasks_file = wd / "tasks"
    if tasks_file.exists():
        prev = int(tasks_file.read_text().strip())
        if prev != cfg.tasks:
            raise ShardSpecError(
                f"{cfg.store} was split into {prev} SLURM tasks; rerun with --tasks {prev} (the shard count is fixed "
                f"for a store), or start a new store"
            )
    scripts = render_scripts(cfg)
    pending = pending_shards(cfg)
    jobs_file = wd / "jobs.json"
    prev_jobs = json.loads(jobs_file.read_text()) if jobs_file.exists() else {}
    active = _active_array_tasks(prev_jobs.get("extract", ""))
    # A previous chain's verify/metrics still waiting would wait forever on a cancelled task
    # (afterok never satisfied); the new chain replaces them.
    stale = [prev_jobs[k] for k in ("verify", "causal", "metrics") if prev_jobs.get(k)]
    need_plan = pending is None
    shards = list(range(cfg.tasks)) if pending is None else [i for i in pending if i not in active]
    steps = chain(cfg, need_plan, shards, prev_jobs.get("extract") if active else None)
    (wd / "logs").mkdir(parents=True, exist_ok=True)  # sbatch writes the jobs' output there
    for stage, text in scripts.items():
        (wd / f"{stage}.sbatch").write_text(text)
    if dry_run:
        for stage, text in scripts.items():
            echo(f"# ---- {wd / (stage + '.sbatch')}\n{text}")
        echo("# ---- the chain: run these lines in a shell to submit it by hand (nothing was submitted)")
        if stale:
            echo(f"scancel {' '.join(stale)}  # the previous chain's stages still waiting")
        for step in steps:
            echo(step.shell())
        return {}
    if stale and shutil.which("scancel"):
        subprocess.run(["scancel", *stale], capture_output=True)
    tasks_file.write_text(f"{cfg.tasks}\n")
    (wd / "config.json").write_text(json.dumps(cfg.__dict__, indent=1))
    jobs: dict[str, str] = {}
    for step in steps:
        jobs[step.stage] = _run(step.argv(jobs)).split(";")[0]
    jobs["shards"] = shards
    if "extract" not in jobs and prev_jobs.get("extract") and active:
        jobs["extract"] = prev_jobs["extract"]
    jobs_file.write_text(json.dumps(jobs))
    echo(f"scripts and logs: {wd}")
    echo(f"submitted: plan={jobs.get('plan', '-')} extract={jobs.get('extract', '-')} "
         f"array={_array_spec(shards) or 'none'} verify={jobs['verify']} "
         + (f"causal={jobs['causal']} " if cfg.causal else "") + f"metrics={jobs['metrics']}")
    return jobs


def _array_spec(shards: list[int]) -> str:
    """Slurm's --array syntax for task ids, runs of consecutive ids as ranges: 0-3,7,9-10."""
    parts, i = [], 0
    ids = sorted(shards)
    while i < len(ids):
        j = i
        while j + 1 < len(ids) and ids[j + 1] == ids[j] + 1:
            j += 1
        parts.append(str(ids[i]) if i == j else f"{ids[i]}-{ids[j]}")
        i = j + 1
    return ",".join(parts)
