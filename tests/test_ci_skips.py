"""CI fails a session in which a test is skipped without being on tests/allowed_skips.py."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent

CASES = '''
import pytest

def test_runs():
    pass

@pytest.mark.slow
def test_slow():
    pass

def test_needs_something():
    if {skip}:
        pytest.skip("some tool is not installed")
'''


def run_suite(tmp_path: Path, skip: bool, ci: str) -> subprocess.CompletedProcess:
    for name in ("conftest.py", "allowed_skips.py"):
        shutil.copy(TESTS / name, tmp_path / name)
    (tmp_path / "test_cases.py").write_text(CASES.format(skip=skip))
    env = {k: v for k, v in os.environ.items() if k != "DPELT_RUN_SLOW"} | {"CI": ci}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", "-W", "ignore::pytest.PytestUnknownMarkWarning", str(tmp_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)  # fmt: skip


def test_unlisted_skip_fails_ci(tmp_path):
    r = run_suite(tmp_path, skip=True, ci="true")
    assert r.returncode == 1, r.stdout[-2000:]
    assert "skipped in CI without being allowed" in r.stdout and "test_needs_something: some tool is not installed" in r.stdout


def test_allowed_skips_pass_ci_and_skips_outside_ci_pass(tmp_path):
    r = run_suite(tmp_path, skip=False, ci="true")  # only the slow test skips: allowed
    assert r.returncode == 0 and "1 skipped" in r.stdout, r.stdout[-2000:]
    r = run_suite(tmp_path, skip=True, ci="")  # outside CI a skip is only reported
    assert r.returncode == 0 and "1 skipped" in r.stdout, r.stdout[-2000:]
