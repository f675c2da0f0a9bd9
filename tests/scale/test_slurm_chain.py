"""The sbatch lines of a chain (no Slurm needed): dependencies, arrays, the dry run."""

from __future__ import annotations

import pytest

from promptshift.scale.slurm import SlurmConfig, _array_spec, chain, submit


@pytest.mark.parametrize("shards, spec", [([0, 1, 2, 3], "0-3"), ([1], "1"), ([0, 2, 3, 4, 7, 9, 10], "0,2-4,7,9-10"),
                                          ([], "")])
def test_array_spec_uses_ranges(shards, spec):
    assert _array_spec(shards) == spec


def test_chain_depends_on_the_stage_before(tmp_path):
    cfg = SlurmConfig(sweep="quick", store=str(tmp_path / "s.zarr"), tasks=4, causal=True)
    steps = chain(cfg, need_plan=True, shards=[0, 1, 2, 3])
    assert [s.stage for s in steps] == ["plan", "extract", "verify", "causal", "metrics"]
    ids = {"plan": "11", "extract": "12", "verify": "13", "causal": "14"}
    assert steps[1].argv(ids) == ["sbatch", "--parsable", "--array=0-3", "--dependency=afterok:11",
                                  str(cfg.workdir / "extract.sbatch")]
    assert steps[4].argv(ids)[2] == "--dependency=afterok:14"
    # a resubmission with nothing left to extract while earlier tasks still run: verify waits for them
    steps = chain(cfg, need_plan=False, shards=[], running_extract="99")
    assert [s.stage for s in steps] == ["verify", "causal", "metrics"]
    assert steps[0].argv({})[2] == "--dependency=afterok:99"


def test_dry_run_writes_scripts_and_prints_lines_but_submits_nothing(tmp_path):
    cfg = SlurmConfig(sweep="quick", store=str(tmp_path / "s.zarr"), tasks=3)
    lines: list[str] = []
    assert submit(cfg, dry_run=True, echo=lines.append) == {}
    chain_lines = lines[lines.index(next(x for x in lines if x.startswith("# ---- the chain"))) + 1:]
    assert chain_lines[0] == f"PLAN_JOB=$(sbatch --parsable {cfg.workdir / 'plan.sbatch'} | cut -d';' -f1)"
    assert chain_lines[1] == (f"EXTRACT_JOB=$(sbatch --parsable --array=0-2 --dependency=afterok:${{PLAN_JOB}} "
                              f"{cfg.workdir / 'extract.sbatch'} | cut -d';' -f1)")
    assert [x.split("=")[0] for x in chain_lines] == ["PLAN_JOB", "EXTRACT_JOB", "VERIFY_JOB", "METRICS_JOB"]
    for stage in ("plan", "extract", "verify", "metrics"):
        assert (cfg.workdir / f"{stage}.sbatch").is_file()
    assert (cfg.workdir / "logs").is_dir()
    assert not (cfg.workdir / "jobs.json").exists() and not (cfg.workdir / "tasks").exists()
