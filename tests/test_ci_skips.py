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


MODULE_SKIPS = {
    "test_importorskip.py": "import pytest\n\nnot_there = pytest.importorskip('dpelt_no_such_module')\n\ndef test_a():\n    pass\n",
    "test_module_skip.py": "import pytest\n\npytest.skip('no such tool here', allow_module_level=True)\n\ndef test_b():\n    pass\n",
}


def run_suite(tmp_path: Path, skip: bool, ci: str, modules: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    for name in ("conftest.py", "allowed_skips.py"):
        shutil.copy(TESTS / name, tmp_path / name)
    (tmp_path / "test_cases.py").write_text(CASES.format(skip=skip))
    for name, text in (modules or {}).items():
        (tmp_path / name).write_text(text)
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


def test_module_level_skip_fails_ci(tmp_path):
    """A module skipped as a whole at import is a skip too (pytest reports it at collection)."""
    for name, text in MODULE_SKIPS.items():
        d = tmp_path / name.removesuffix(".py")
        d.mkdir()
        r = run_suite(d, skip=False, ci="true", modules={name: text})
        assert r.returncode == 1, r.stdout[-2000:]
        assert "skipped in CI without being allowed" in r.stdout and name in r.stdout.split("skipped in CI without being allowed")[1], r.stdout[-2000:]
        r = run_suite(d, skip=False, ci="")
        assert r.returncode == 0, r.stdout[-2000:]


def test_ci_detection_is_case_insensitive_in_the_makefile(tmp_path):
    """CI=TRUE (as some CI systems spell it) counts as CI for make too, as for conftest."""
    probe = ["make", "-s", "-f", str(TESTS.parent / "Makefile"), "--eval", "probe-ci: ; @echo ci=[$(CI_TRUE)]", "probe-ci"]
    for value, expect in (("TRUE", "ci=[true]"), ("True", "ci=[true]"), ("1", "ci=[1]"), ("", "ci=[]"), ("false", "ci=[]")):
        out = subprocess.run(probe + [f"CI={value}"], cwd=tmp_path, capture_output=True, text=True, timeout=60).stdout
        assert expect in out, (value, out)


def test_deepmd_venv_uses_the_makefiles_python_and_refuses_an_unsupported_one(tmp_path):
    plan = subprocess.run(["make", "-n", "-f", str(TESTS.parent / "Makefile"), "deepmd-venv", "PYTHON=python3.12", f"DEEPMD_VENV={tmp_path / 'v'}"],
                          cwd=TESTS.parent, capture_output=True, text=True, timeout=60).stdout  # fmt: skip
    assert "PYTHON=python3.12 bash bench/deepmd/setup_venv.sh" in plan, plan
    old = tmp_path / "python"
    old.write_text("#!/bin/sh\necho 3.9\n")
    old.chmod(0o755)
    r = subprocess.run(["bash", str(TESTS.parent / "bench/deepmd/setup_venv.sh"), str(tmp_path / "v")], env=dict(os.environ, PYTHON=str(old)),
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 2 and "is Python 3.9" in r.stderr and "3.10-3.12" in r.stderr, r.stderr
    assert not (tmp_path / "v").exists()  # refused before anything was created


def test_deepmd_venv_builds_wait_for_each_other(tmp_path):
    """Two CI runs share the venv under ~/.cache: a build waits for the lock of another."""
    import fcntl

    venv = tmp_path / "v"
    with open(f"{venv}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        r = subprocess.run(["bash", str(TESTS.parent / "bench/deepmd/setup_venv.sh"), str(venv)], env=dict(os.environ, DPELT_VENV_LOCK_TIMEOUT="1"),
                           capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 1 and "another build" in r.stderr, r.stderr
    assert not venv.exists()
