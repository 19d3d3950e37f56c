"""What became of runs submitted through submitit: ``gptlab status``.

The run directories say what each run did; ``.submitit/jobs.json`` says which job each was
submitted as, so a run still queued (no directory yet) is listed too. Slurm is asked once, and
only about runs that have not finished.
"""
from __future__ import annotations

import contextlib
import re
import sys
from pathlib import Path
from typing import Any, Iterator, Optional

from .. import rundir as rd
from ..errors import ConfigError, DamagedFile
from .launch import FINAL_STATES, JOBS, QUEUED, REQUEUED, SUBMITIT

#: a Slurm job id (12345, 12345_7, 12345_[0-9%2]) or a local job's process id
_JOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+%,\[\]-]{0,99}")
#: the status of a run whose folder cannot be trusted (see rundir.damage)
DAMAGED = "damaged"


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
        said: list[str] = []
        try:
            from submitit import SlurmJob  # its import configures its logger: before _quiet_submitit

            with _quiet_submitit(said):
                for job_id in slurm:
                    SlurmJob(folder, job_id)  # registers the id with submitit's shared watcher
                SlurmJob.watcher.update()  # one sacct call for every array
                states.update({job_id: str(SlurmJob.watcher.get_state(job_id, mode="cache")) for job_id in slurm})
        except Exception:  # no submitit, no sacct: the run directories alone have to say it
            states.update(dict.fromkeys(slurm, "UNKNOWN"))
        if said:
            sys.stderr.write(f"gptlab: warning: Slurm could not be asked about {len(slurm)} job(s), so their state "
                             f"is unknown ({' '.join(said[0].split())[:200]})\n")
    return states


@contextlib.contextmanager
def _quiet_submitit(said: list[str]) -> Iterator[None]:
    """Around a call into submitit: its log records (it logs to stdout as well as stderr, e.g.
    "Bypassing sacct error" when sacct is missing) and anything printed are kept off stdout, so
    ``gptlab status --json`` prints JSON alone; the records' messages are collected for one
    warning line."""
    import logging
    import warnings

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.levelno >= logging.WARNING:
                said.append(record.getMessage())

    log = logging.getLogger("submitit")
    saved = (log.handlers[:], log.propagate)
    log.handlers[:] = [Collect()]
    log.propagate = False
    try:
        with contextlib.redirect_stdout(sys.stderr), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        log.handlers[:], log.propagate = saved


def _alive(pid: str) -> bool:
    """Whether a local job's controller (pid) still runs (not a zombie, not another program)."""
    try:
        stat = Path(f"/proc/{int(pid)}/stat").read_text()
        cmdline = Path(f"/proc/{int(pid)}/cmdline").read_bytes()
    except (OSError, ValueError):
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z" and b"submitit" in cmdline


def recorded_jobs(exp_dir: Path) -> dict[str, dict]:
    """Run directory name -> the job it was last submitted as (job_id, variant, seed, launcher).

    jobs.json is read bounded and checked entry by entry (see _submission_problem); entries that
    are not what ``gptlab run`` writes are left out with one warning line naming the file."""
    path = Path(exp_dir) / SUBMITIT / JOBS
    try:
        data = rd.load_json(path, dict)
    except FileNotFoundError:
        return {}
    except DamagedFile as exc:
        sys.stderr.write(f"gptlab: warning: ignoring {exc}; runs still queued cannot be listed\n")
        return {}
    submissions = data.get("submissions")
    if not isinstance(submissions, list):
        sys.stderr.write(f"gptlab: warning: ignoring {path}: its submissions are "
                         f"{'missing' if submissions is None else 'not a list'}; runs still queued cannot be listed\n")
        return {}
    out: dict[str, dict] = {}
    problems = []
    for number, entry in enumerate(submissions, 1):
        problem = _submission_problem(entry)
        if problem:
            problems.append(f"submission {number} {problem}")
            continue
        launcher = entry.get("launcher") or "slurm"
        for name, run in entry["runs"].items():
            out[name] = {**run, "job_id": str(run["job_id"]), "launcher": launcher}
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        sys.stderr.write(f"gptlab: warning: {path}: ignoring what is not what gptlab writes: {problems[0]}{more}\n")
    return out


def _submission_problem(entry: Any) -> Optional[str]:
    """Why one submission of jobs.json is not what ``gptlab run`` writes, or None. Run names must
    be plain folder names (a name such as ../x would make status read outside the experiment)."""
    if not isinstance(entry, dict):
        return "is not a mapping"
    if entry.get("launcher") is not None and entry["launcher"] not in ("slurm", "local"):
        return "has a launcher other than slurm or local"
    runs = entry.get("runs")
    if not isinstance(runs, dict):
        return "has no mapping of runs"
    for name, run in runs.items():
        if name in ("", ".", "..") or "/" in name or "\0" in name or name.startswith("."):
            return f"names a run {name[:60]!r} that is not a run folder's name"
        if not isinstance(run, dict):
            return f"holds run {name[:60]} as {type(run).__name__}, not a mapping"
        job_id = run.get("job_id")
        if isinstance(job_id, bool) or not isinstance(job_id, (str, int)) or not _JOB_ID.fullmatch(str(job_id)):
            return f"holds a job id for {name[:60]} that is not one"
        if run.get("seed") is not None and (isinstance(run["seed"], bool) or not isinstance(run["seed"], int)):
            return f"holds a seed for {name[:60]} that is not an integer"
        if run.get("variant") is not None and not isinstance(run["variant"], str):
            return f"holds a variant for {name[:60]} that is not text"
    return None


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
    damaged = {}
    for name in sorted(names):
        reason = rd.damage(exp_dir / name)
        if reason:  # one line naming it; the run is listed as damaged, the others as usual
            sys.stderr.write(f"gptlab: warning: damaged run {exp_dir / name}: {reason}\n")
            damaged[name] = reason
    runs = {name: (exp_dir / name, None if name in damaged else rd.read_summary(exp_dir / name), jobs.get(name))
            for name in sorted(names | set(jobs))}
    unsettled = [job for name, (_, summary, job) in runs.items()
                 if job and name not in damaged and (summary or {}).get("status") not in (rd.COMPLETED, rd.DIVERGED,
                                                                                          rd.FAILED)]
    states = _job_states(exp_dir / SUBMITIT, unsettled)
    rows = []
    for name, (run_dir, summary, job) in runs.items():
        config = {} if name in damaged else rd.read_config(run_dir)
        last = None
        for last in () if name in damaged else rd.metric_rows(run_dir):
            pass
        state = states.get(job["job_id"]) if job else None
        status, note = (DAMAGED, damaged[name]) if name in damaged else _run_state(run_dir, summary, job, state)
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
