"""Process set-up of compute steps (pipeline.runtime)."""

import os
import subprocess
import sys

import pytest
import torch

from pipeline import runtime
from pipeline.runtime import configure_torch, set_openmp_environment


def test_configure_torch_is_deterministic_without_nan_filling():
    threads, det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    try:
        assert configure_torch(1) == 1
        assert torch.get_num_threads() == 1
        assert torch.are_deterministic_algorithms_enabled()
        # deterministic mode would otherwise NaN-fill every new tensor: an extra pass per allocation
        assert torch.utils.deterministic.fill_uninitialized_memory is False
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(det)
        torch.utils.deterministic.fill_uninitialized_memory = fill


def _openmp_settings(env_extra: dict) -> str:
    """What the OpenMP runtime of a fresh process that starts as a dpelt job does (``import
    pipeline.cli``, then torch) reports about itself (OMP_DISPLAY_ENV, printed when it loads)."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(env_extra, OMP_DISPLAY_ENV="VERBOSE")
    code = "import pipeline.cli, torch, os; torch.ones(4).sum(); print('child env', os.environ.get('OMP_WAIT_POLICY'))"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return proc.stdout + proc.stderr


def test_job_processes_wait_passively():
    """A job's OpenMP threads sleep at barriers instead of spinning (under load, spinning threads
    wait on descheduled ones: bench/oversubscription.py), and its children inherit the policy."""
    shown = _openmp_settings({})
    assert "OMP_WAIT_POLICY = 'PASSIVE'" in shown
    if "GOMP_SPINCOUNT" in shown:  # GNU OpenMP (torch's Linux wheels): no spinning at all
        assert "GOMP_SPINCOUNT = '0'" in shown
    assert "child env PASSIVE" in shown


def test_wait_policy_chosen_by_the_user_is_kept():
    shown = _openmp_settings({"GOMP_SPINCOUNT": "300000"})
    if "GOMP_SPINCOUNT" not in shown:
        pytest.skip("not GNU OpenMP")
    assert "GOMP_SPINCOUNT = '300000'" in shown
    env = {"OMP_WAIT_POLICY": "ACTIVE"}
    assert set_openmp_environment(env) == {} and env == {"OMP_WAIT_POLICY": "ACTIVE"}
    env = {}
    assert set_openmp_environment(env) == {"OMP_WAIT_POLICY": "PASSIVE"} and env == {"OMP_WAIT_POLICY": "PASSIVE"}


def test_more_threads_than_cpus_is_warned(monkeypatch):
    threads = torch.get_num_threads()
    monkeypatch.setattr(runtime, "cpus_available", lambda: 1)
    try:
        with pytest.warns(UserWarning, match="2 threads on 1 available CPUs"):
            configure_torch(2)
    finally:
        torch.set_num_threads(threads)
