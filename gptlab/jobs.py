"""What became of runs submitted through submitit: ``gptlab status``.

The run directories say what each run did; ``.submitit/jobs.json`` says which job each was
submitted as, so a run still queued (no directory yet) is listed too. Slurm is asked once, and
only about runs that have not finished.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from . import rundir as rd
from .errors import ConfigError
from .launch import FINAL_STATES, JOBS, QUEUED, REQUEUED, SUBMITIT


def _job_states(folder: Path, jobs: list[dict]) -> dict[str, str]:
    """job id -> state, for the recorded jobs whose runs have not finished. A job that left its
    result is FINISHED; a local job (a process id) is RUNNING while its controller lives, else
    ENDED; Slurm is asked once for all (sacct, through submitit), UNKNOWN when it cannot say."""
    states, slurm = {}, []
    for job in jobs:
        job_id = job["job_id"]
        if (folder / f"{job_id}_0_result.pkl").exists():
            states[job_id] = "FINISHED"
        elif job["launcher"] == "local":
            states[job_id] = "RUNNING" if _alive(job_id) else "ENDED"
        else:
            slurm.append(job_id)
    if slurm:
        try:
            from submitit import SlurmJob

            for job_id in slurm:
                SlurmJob(folder, job_id)  # registers the id with submitit's shared watcher
            SlurmJob.watcher.update()  # one sacct call for every array
            states.update({job_id: SlurmJob.watcher.get_state(job_id, mode="cache") for job_id in slurm})
        except Exception:  # no submitit, no sacct: the run directories alone have to say it
            states.update(dict.fromkeys(slurm, "UNKNOWN"))
    return states


def _alive(pid: str) -> bool:
    """Whether a local job's controller (pid) still runs (not a zombie, not another program)."""
    try:
        stat = Path(f"/proc/{int(pid)}/stat").read_text()
        cmdline = Path(f"/proc/{int(pid)}/cmdline").read_bytes()
    except (OSError, ValueError):
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z" and b"submitit" in cmdline


def recorded_jobs(exp_dir: Path) -> dict[str, dict]:
    """Run directory name -> the job it was last submitted as (job_id, variant, seed, launcher)."""
    data = rd.read_json(Path(exp_dir) / SUBMITIT / JOBS) or {}
    out: dict[str, dict] = {}
    for entry in data.get("submissions") or []:
        if isinstance(entry, dict) and isinstance(entry.get("runs"), dict):
            for name, run in entry["runs"].items():
                if isinstance(run, dict) and "job_id" in run:
                    out[name] = {**run, "job_id": str(run["job_id"]), "launcher": entry.get("launcher", "slurm")}
    return out


def experiment_status(exp_dir: Path) -> list[dict]:
    """One row per run of an experiment folder: its run directory read together with the job
    jobs.json says it was last submitted as, so runs still waiting in the queue are listed too."""
    exp_dir = Path(exp_dir)
    if not exp_dir.is_dir():
        raise ConfigError(f"{exp_dir} is not an experiment folder; pass results/<experiment>")
    jobs = recorded_jobs(exp_dir)
    names = {p.name for p in exp_dir.iterdir() if p.is_dir() and not p.name.startswith(".") and rd.is_run_dir(p)}
    if not (jobs or names or (exp_dir / rd.EXPERIMENT).is_file()):
        raise ConfigError(f"{exp_dir} holds no experiment (no {rd.EXPERIMENT}, runs or submitted jobs); "
                          f"pass results/<experiment>")
    runs = {name: (exp_dir / name, rd.read_summary(exp_dir / name), jobs.get(name))
            for name in sorted(names | set(jobs))}
    unsettled = [job for _, summary, job in runs.values()
                 if job and (summary or {}).get("status") not in (rd.COMPLETED, rd.DIVERGED, rd.FAILED)]
    states = _job_states(exp_dir / SUBMITIT, unsettled)
    rows = []
    for name, (run_dir, summary, job) in runs.items():
        config = rd.read_config(run_dir)
        last = None
        for last in rd.metric_rows(run_dir):
            pass
        state = states.get(job["job_id"]) if job else None
        status, note = _run_state(run_dir, summary, job, state)
        train = config.get("train") if isinstance(config.get("train"), dict) else {}
        val = (summary or {}).get("final_val_loss")
        known = summary or config or job or {}
        rows.append({
            "experiment": exp_dir.name, "variant": known.get("variant"),
            "seed": known.get("seed", rd.seed_from_name(name)), "status": status,
            "step": (last or {}).get("step"), "steps": train.get("steps"),
            "val_loss": val if isinstance(val, (int, float)) else (last or {}).get("val_loss"),
            "job_id": job["job_id"] if job else None, "job_state": state, "note": note, "run_dir": str(run_dir)})
    return rows


def _run_state(run_dir: Path, summary: Optional[dict], job: Optional[dict], state: Optional[str]) -> tuple[str, str]:
    """(status, note): the run directory's word, corrected by its job's state where the directory
    cannot know (not started yet, a lock held on another node, an interrupted run that is requeued).
    A job Slurm says nothing about (UNKNOWN) may still be alive: it keeps a queued or running run so."""
    unknown = state is not None and state.upper() == "UNKNOWN"
    active = state is not None and not unknown and not state.upper().startswith(FINAL_STATES)
    recorded = (summary or {}).get("status")
    if summary is None:
        if job is None:
            return rd.run_status(run_dir, summary), ""
        if active or unknown:
            return QUEUED, ""
        log = Path(run_dir).parent / SUBMITIT / f"{job['job_id']}_0_log.err"
        return rd.FAILED, f"job {job['job_id']} ended without starting the run; see {log}"
    if recorded in (rd.RUNNING, None):  # a lock held on another node may not show here: the job's state says
        return (rd.RUNNING if rd.lock_held(run_dir) or active or unknown else rd.INTERRUPTED), ""
    if recorded == rd.INTERRUPTED and active:
        return REQUEUED, ""
    return str(recorded), ""
