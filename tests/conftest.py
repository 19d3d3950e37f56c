"""The suite's fixtures and its fast lane. Shared helpers are in helpers.py, the plain-torch
reference GPT in reference_gpt.py; each test lives in the folder of the package it tests."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import gptlab

# Re-exported: shared helpers used to live here, and a test written as `from conftest import ...` keeps working.
from helpers import (ACTIVATIONS, ATTENTIONS, NORMS, PLACEMENTS, POSITIONS, REPO_ROOT, TINY,  # noqa: F401
                     build, clone_into, randomize_, run_cli, tiny_cfg, tree_hash, write_plugin)

TESTS = Path(__file__).resolve().parent

# Every model here is tiny: intra-op threads buy nothing and, on a shared 2-core machine, thread
# oversubscription makes the 640-combination sweep ~20x slower. One thread keeps the suite fast.
torch.set_num_threads(1)
os.environ["OMP_NUM_THREADS"] = "1"  # and gptlab run, called in-process, keeps to one thread too


@pytest.fixture(autouse=True)
def _neutral_working_directory(tmp_path_factory, monkeypatch):
    """Run each test from an empty folder, so a user's own ./plugins in the checkout (the README
    tutorial puts one there) cannot change what the tests load. Tests that need the checkout as
    the working directory chdir there themselves."""
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))


@pytest.fixture(scope="session")
def builtin_system():
    """A plugin system holding only the built-in plugins (no entry points, no ./plugins)."""
    system = gptlab.PluginSystem()
    system.load_builtins()
    return system


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """``tmp_path`` as the working directory, at 200 columns: where a user types gptlab commands."""
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def cli(capsys, monkeypatch):
    """``gptlab ARGS`` in this process at 200 columns: ``cli(*args)`` -> (exit status, stdout, stderr)."""
    monkeypatch.setenv("COLUMNS", "200")
    return lambda *args: run_cli(capsys, *args)


# -- the fast lane ----------------------------------------------------------------------------------
#: the tests `pytest -m "not slow"` leaves out (by path under tests/; None: every test of the file):
#: subprocess runs that take several seconds each (torchrun groups, killed and resumed runs, worker
#: pools, the tutorial as a user types it, the GPU check script's CPU run). Each module they exercise
#: keeps quicker tests in the fast lane; the full suite (.ci/run) runs them all.
SLOW = {
    "train/test_distributed.py": None,  # every test starts a 2-process torchrun
    "data/test_prepare_parallel.py": None,  # --jobs 2 and a 2-process torchrun on a documents corpus
    "train/test_resume.py": None,  # every test kills or interrupts a real `gptlab run` subprocess
    "run/test_parallel.py": {"test_two_at_once_equals_one_by_one_and_logs_plain_lines",
                             "test_a_locked_run_is_left_to_its_owner", "test_ctrl_c_stops_every_run_resumably"},
    "run/test_launch.py": {"test_a_task_signalled_before_its_time_limit_is_requeued_and_resumes_bit_for_bit"},
    "project/test_tutorial.py": {"test_the_tutorial_commands_run_as_written",
                                 "test_the_optimizer_plugin_runs_as_written_and_gives_the_table_shown"},
    "project/test_tutorial_aux.py": {"test_the_aux_loss_tutorial_runs_as_written"},  # a subprocess run (~18 s)
    # the script's whole CPU run (~20 s); its GPU-only logic stays in the fast lane
    "benchmarks/test_gpu_check.py": {"test_cpu_run_exits_zero", "test_report_says_no_gpu_was_found",
                                     "test_every_check_passes", "test_logits_differences_are_numbers_below_tolerance"},
    "run/test_tracking.py": {"test_sinks_work_in_jobs_workers"},
    "run/test_runner.py": {"test_ctrl_c_marks_the_run_interrupted_and_a_rerun_resumes"},
    "train/test_gpu_path.py": {"test_mfu_is_per_device_under_a_two_process_torchrun"},
    "project/test_packaging.py": {"test_wheel_carries_builtin_plugins_and_they_load"},
    # one interpreter each; the fast lane keeps one case per layer that refuses (the rest are checked
    # in-process too, in run/test_dry_run.py and cli/test_hardening.py)
    "cli/test_bad_input.py": {f"test_bad_input_is_one_line_exit_2_and_touches_nothing[{case}]" for case in (
        "unknown-model-key", "unknown-train-key", "wrong-type", "unknown-component", "missing-dataset-path",
        "context-longer-than-corpus", "zero-steps", "negative-batch-size", "unwritable-results-dir",
        "unknown-option", "unknown-section")},
    # real commands whose refusal config/test_harden_sizes.py also checks in-process
    "config/test_harden_sizes.py": {"test_a_deep_wide_model_is_refused_before_the_meta_build",
                                    "test_a_config_claiming_a_billion_positions_is_refused_by_size",
                                    "test_an_infinite_eval_length_stops_the_real_command_before_training",
                                    "test_a_refused_pickle_is_exactly_one_line"},
}


def _exists(module, name: str) -> bool:
    """Whether ``module`` has the test ``name`` ("test_x", or "test_x[case]" with the case among the ids
    the test's parametrize marks give)."""
    function, _, case = name.partition("[")
    if not hasattr(module, function):
        return False
    marks = getattr(getattr(module, function), "pytestmark", [])
    return not case or any(case[:-1] in (mark.kwargs.get("ids") or ()) for mark in marks if mark.name == "parametrize")


def pytest_collection_modifyitems(config, items):
    """Mark the SLOW tests (a name with [parameters] marks that case alone); a file or test named there
    that no longer exists is an error, so the list cannot silently shrink when a test is moved or renamed."""
    modules = {}
    for item in items:
        path = Path(str(item.fspath)).resolve()
        file = path.relative_to(TESTS).as_posix() if path.is_relative_to(TESTS) else path.name
        modules[file] = item.module
        if file in SLOW and (SLOW[file] is None or item.originalname in SLOW[file] or item.name in SLOW[file]):
            item.add_marker(pytest.mark.slow)
    missing = [file for file in SLOW if not (TESTS / file).is_file()]
    missing += [f"{file}::{name}" for file, module in modules.items() for name in sorted(SLOW.get(file) or ())
                if not _exists(module, name)]
    if missing:
        raise pytest.UsageError(f"tests/conftest.py SLOW names tests that do not exist: {', '.join(missing)}")
