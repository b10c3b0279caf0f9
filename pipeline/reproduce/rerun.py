"""Re-execution of a published run in a fresh directory: the workflow as committed at a tag, Snakemake.

The work directory gets the files of the run's git tree at the tag (Snakefile, rules, config,
input files) without what the run produced (the DVC-tracked ``data/init``, ``data/holdout``,
``iter/NNN``, the manifests and reports); other DVC-tracked inputs (data a config imports)
are copied from the clone. It is not a git repository, so the re-executed run never
publishes anything.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Sequence

from ..errors import DpeltError
from ..fileio import atomic_path
from ..versioning import DATA_DIRS, run

OUTPUT_DVC = re.compile(r"^(iter/\d{3}|data/init|data/holdout)\.dvc$")
NOT_COPIED = ("manifests/", "reports/", ".dvc/", "reproduce/")


def tracked_files(root: Path, tag: str) -> list[str]:
    return run(["git", "ls-tree", "-r", "--name-only", tag], root).stdout.splitlines()


def prepare_workdir(root: Path, tag: str, workdir: Path) -> list[str]:
    """Fill ``workdir`` with the run's files at ``tag``; returns the other DVC inputs copied."""
    files = [f for f in tracked_files(root, tag) if not OUTPUT_DVC.match(f) and not f.startswith(NOT_COPIED) and f != ".dvcignore"]
    if "Snakefile" not in files:
        raise DpeltError(f"the tag {tag} holds no Snakefile: the workflow was not committed with the run", path=root, key="tag")
    archive = subprocess.run(["git", "archive", "--format=tar", tag, "--", *files], cwd=root, capture_output=True, check=False)
    if archive.returncode != 0:
        raise DpeltError(f"`git archive {tag}` failed: {archive.stderr.decode(errors='replace').strip()}", path=root)
    workdir.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(workdir, filter="data")
    inputs = []
    for dvc in (f for f in files if f.endswith(".dvc")):
        src, dst = root / dvc[: -len(".dvc")], workdir / dvc[: -len(".dvc")]
        if not src.exists():
            raise DpeltError("an input of the run tracked by DVC is not in the clone: run `dvc pull` first", path=src)
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, dst)
        inputs.append(dvc[: -len(".dvc")])
    return inputs


def copy_published_data(root: Path, workdir: Path, expected: dict[str, str]) -> list[str]:
    """Copy the published ``data/init`` and ``data/holdout`` (each file checked against the
    manifest's sha256) into ``workdir``, unless already there; returns their paths."""
    from ..versioning import sha256

    copied = []
    for rel, digest in sorted(expected.items()):
        if not rel.startswith(tuple(d + "/" for d in DATA_DIRS)):
            continue
        src = root / rel
        if not src.exists():
            raise DpeltError("--reuse-labels needs the published copy of this file: run `dvc pull` first", path=src)
        if sha256(src) != digest:
            raise DpeltError("the published copy differs from its manifest's sha256: --reuse-labels cannot take it (check with `dpelt verify`)", path=src)
        dst = workdir / rel
        if not (dst.is_file() and sha256(dst) == digest):  # (a resumed reproduction has them)
            with atomic_path(dst) as tmp:
                shutil.copyfile(src, tmp)
        copied.append(rel)
    return copied


def snakemake_command() -> list[str]:
    """The Snakemake of this Python environment (beside ``sys.executable``), else the one on PATH."""
    here = Path(sys.executable).parent / "snakemake"
    if here.exists():
        return [str(here)]
    found = shutil.which("snakemake")
    if found is None:
        raise DpeltError("snakemake is not installed or not on PATH")
    return [found]


def snakemake(workdir: Path, configfile: str, targets: Sequence[str], cores: str, logfile: Path) -> None:
    """Run Snakemake in ``workdir`` for ``targets``; its output is appended to ``logfile``. The
    jobs' ``dpelt`` is the one of this environment (its directory first on PATH)."""
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    cmd = snakemake_command() + ["--configfile", configfile, "--cores", str(cores), *targets]
    with open(logfile, "a") as log:
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        proc = subprocess.run(cmd, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = [line for line in logfile.read_text(errors="replace").splitlines() if line.strip()][-15:]
        raise DpeltError("the re-execution failed (Snakemake exit {}); last lines of {}:\n  {}".format(proc.returncode, logfile, "\n  ".join(tail)), path=workdir)


def iteration_targets(n: int, upto: str = "eval") -> list[str]:
    """Snakemake targets that finish iterations 0..n (``upto="select"``: only their selection)."""
    out = []
    for j in range(n + 1):
        d = f"iter/{j:03d}"
        out += [f"{d}/select/report.json"] if upto == "select" else [f"{d}/label/summary.json", f"{d}/eval/metrics.json"]
    return out
