"""Versioning of finished iterations with DVC and git: publish, restore, verify.

Snakemake owns the run; DVC is storage and registry. ``publish`` snapshots every finished
iteration that is not published yet: ``dvc add iter/NNN`` (and ``data/init``,
``data/holdout`` once), a sha256 manifest ``manifests/iter-NNN.json`` of every file, a git
commit and the tag ``iter-NNN``. ``restore iter-NNN`` brings back that iteration's datasets
and models (git checkout of the ``.dvc`` files and manifests, ``dvc checkout``), moves later
iterations aside into ``attic/`` (nothing computed is deleted) and sets file times in the
order of the workflow, so Snakemake reruns nothing up to NNN and continues from there.
``verify`` recomputes the hashes of a published iteration.

Each manifest also records the run (``run``: its config file, that file's sha256, the seed)
and what bit-identity depends on (``environment``: dpelt code, Python, NumPy, torch, CPU
instruction set, embedding kernel, threads per job, oracle and its package, …; see
:mod:`pipeline.reproduce.environment`), so that ``dpelt reproduce`` can re-execute the run
and say up front what differs on the reader's machine.

Only one DVC command runs at a time (a file lock); DVC's analytics are switched off.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator, Sequence

from .errors import DpeltError
from .fileio import write_json_atomic

ITER_RE = re.compile(r"^\d{3}$")
STEP_ORDER = ("train", "explore", "select", "label", "eval")
DATA_DIRS = ("data/init", "data/holdout")


def _env() -> dict:
    return dict(os.environ, DVC_NO_ANALYTICS="1", GIT_TERMINAL_PROMPT="0")


def tool(name: str) -> str | None:
    """Path of the program ``name``: beside dpelt's own interpreter first (``.venv/bin/dvc`` when
    ``.venv/bin/dpelt`` runs without the venv activated), then on PATH; None if neither has it."""
    here = Path(sys.executable).parent / name
    if here.is_file() and os.access(here, os.X_OK):
        return str(here)
    return shutil.which(name)


def require_tool(name: str) -> str:
    """:func:`tool`, or one error saying where it was looked for."""
    found = tool(name)
    if found is None:
        raise DpeltError(f"{name} is not installed: not beside {Path(sys.executable).parent} nor on PATH (pip install -e . installs it)")
    return found


def run(cmd: Sequence[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    """Run git/dvc (found by :func:`tool`); a failure becomes one DpeltError with the command's own message."""
    cmd = [require_tool(cmd[0])] + list(cmd[1:])
    proc = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True)
    cmd[0] = Path(cmd[0]).name  # messages name the command as typed
    if check and proc.returncode != 0:
        msg = (proc.stderr or proc.stdout).strip().splitlines()
        raise DpeltError(f"`{' '.join(cmd)}` failed: {msg[-1] if msg else 'exit ' + str(proc.returncode)}", path=cwd)
    return proc


@contextlib.contextmanager
def dvc_lock(root: Path, timeout_s: float | None = None) -> Iterator[None]:
    """Serialise dpelt's git/DVC operations in ``root`` (a second publish waits, then gives up
    after ``timeout_s``, default $DPELT_LOCK_TIMEOUT or 600 s)."""
    if timeout_s is None:
        timeout_s = float(os.environ.get("DPELT_LOCK_TIMEOUT", 600))
    lock_dir = root / ".dpelt"
    lock_dir.mkdir(exist_ok=True)
    with open(lock_dir / "dvc.lock", "w") as fh:
        t0 = time.monotonic()
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() - t0 > timeout_s:
                    raise DpeltError("another dpelt publish/restore holds the lock", path=lock_dir / "dvc.lock") from None
                time.sleep(0.5)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def is_git_repo(root: Path) -> bool:
    return run(["git", "rev-parse", "--is-inside-work-tree"], root, check=False).returncode == 0


def ensure_dvc(root: Path) -> None:
    """``dvc init`` (analytics off) in a git repository that has no DVC yet."""
    if not is_git_repo(root):
        raise DpeltError("not a git repository: run `git init` here to version the run", path=root)
    if not (root / ".dvc").exists():
        run(["dvc", "init", "-q"], root)
        run(["dvc", "config", "core.analytics", "false"], root)
        run(["git", "add", ".dvc", ".dvcignore"], root)
        run(["git", "commit", "-q", "-m", "dpelt: dvc init"], root)
    else:
        run(["dvc", "config", "core.analytics", "false"], root)


def iteration_dirs(root: Path) -> list[Path]:
    base = root / "iter"
    return sorted(p for p in base.iterdir() if p.is_dir() and ITER_RE.match(p.name)) if base.exists() else []


def is_finished(d: Path) -> bool:
    """An iteration is finished when its last outputs exist and Snakemake marks nothing incomplete."""
    return (d / "eval" / "metrics.json").exists() and (d / "label" / "summary.json").exists()


def files_under(paths: Sequence[Path]) -> list[Path]:
    out = []
    for p in paths:
        if p.is_file():
            out.append(p)
        elif p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.is_file())
    return out


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def manifest(root: Path, paths: Sequence[Path], data_only: bool = False) -> dict[str, str]:
    """{relative path: sha256} of every file (optionally only datasets ``*.nc`` and models ``*.pt``)."""
    out = {}
    for f in files_under(paths):
        if data_only and f.suffix not in (".nc", ".pt"):
            continue
        out[str(f.relative_to(root))] = sha256(f)
    return dict(sorted(out.items()))


def _keep_mtimes(paths: Sequence[Path]):
    stamps = {f: f.stat().st_mtime_ns for f in files_under(paths)}

    def restore() -> None:
        for f, ns in stamps.items():
            if f.exists():
                os.utime(f, ns=(ns, ns))

    return restore


DEFAULT_CONFIG = "config/config.yaml"


def run_record(root: Path, configfile: str | os.PathLike | None = None, log=print) -> tuple[dict, dict]:
    """(``run`` entry, validated config) of the run in ``root`` whose config is ``configfile``
    (default config/config.yaml; relative paths are relative to ``root``, as Snakemake's are).
    A config outside ``root`` is recorded by its absolute path only (``config_outside``): it
    is not committed, and a reader cannot reproduce the run without it."""
    import yaml

    from .runconfig import SCHEMA, validate_schema

    path = Path(configfile or DEFAULT_CONFIG)
    path = path if path.is_absolute() else root / path
    if not path.is_file():
        raise DpeltError("the run's config file is not there (give the one the run used: --configfile)", path=path, key="configfile")
    try:
        rel = str(path.resolve().relative_to(root))
    except ValueError:
        rel = None
        log(f"warning: the run's config {path} lies outside the run directory: it is not published with the run, and `dpelt reproduce` needs it (copy it into the run directory)")
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise DpeltError(f"cannot parse YAML: {exc}", path=path) from None
    schema = root / "config" / "schema.yaml"
    validate_schema(config, schema if schema.exists() else SCHEMA, str(path))
    entry = {"config_file": rel, "config_sha256": sha256(path), "seed": int(config["seed"])}
    return entry | ({} if rel else {"config_outside": str(path.resolve())}), config


def publish(
    root: str | os.PathLike = ".",
    iterations: Sequence[int] | None = None,
    remote: str | None = None,
    log=print,
    configfile: str | os.PathLike | None = None,
) -> list[str]:
    """Publish finished, unpublished iterations (all, or those given). Returns the new tags.

    ``configfile``: the run's config (default config/config.yaml), committed with the tags and
    named in each manifest with the environment bit-identity depends on."""
    from .reproduce.environment import describe

    root = Path(root).resolve()
    with dvc_lock(root):
        ensure_dvc(root)
        run_entry, environment = None, None
        tags = set(run(["git", "tag", "--list", "iter-*"], root).stdout.split())
        todo = [d for d in iteration_dirs(root) if is_finished(d) and (iterations is None or int(d.name) in iterations)]
        new = []
        for d in todo:
            tag = f"iter-{d.name}"
            if tag in tags:
                continue
            if run_entry is None:
                run_entry, config = run_record(root, configfile, log)
                environment = describe(config)
            targets = [root / p for p in DATA_DIRS if (root / p).exists()] + [d]
            restore = _keep_mtimes(targets)
            try:
                run(["dvc", "add", "-q"] + [str(t.relative_to(root)) for t in targets], root)
            finally:
                restore()
            mf = {
                "iteration": d.name,
                "files": manifest(root, targets),
                "datasets_and_models": manifest(root, targets, data_only=True),
                "run": run_entry,
                "environment": environment,
            }
            write_json_atomic(root / "manifests" / f"{tag}.json", mf)
            add = [str(t.relative_to(root)) + ".dvc" for t in targets] + [f"manifests/{tag}.json"]
            add += [p for p in ("iter/.gitignore", "data/.gitignore", "dvc.yaml", "config", "reports", run_entry["config_file"]) if p and (root / p).exists()]
            run(["git", "add", "-f"] + add, root)
            run(["git", "add"] + [p for p in ("Snakefile", "rules") if (root / p).exists()], root)  # the workflow a reader re-executes
            run(["git", "commit", "-q", "--allow-empty", "-m", f"dpelt: publish iteration {d.name}"], root)
            run(["git", "tag", tag], root)
            new.append(tag)
            log(f"published {tag}")
        if remote and new:
            run(["dvc", "push", "-q", "-r", remote], root)
            log(f"pushed to DVC remote {remote}")
        return new


def _set_workflow_times(root: Path, iters: Sequence[Path]) -> None:
    """File times in the workflow's order: data, then per iteration train < explore < select < label < eval."""
    t = time.time() - 100_000.0
    for p in DATA_DIRS:
        for f in files_under([root / p]):
            os.utime(f, (t, t))
    for d in iters:
        for step in STEP_ORDER:
            t += 1.0
            for f in files_under([d / step]):
                os.utime(f, (t, t))


def restore(root: str | os.PathLike, tag: str, log=print) -> dict:
    """Bring back the datasets and models of ``tag`` (iter-NNN); later iterations go to attic/."""
    root = Path(root).resolve()
    m = re.fullmatch(r"iter-(\d{3})", tag)
    if not m:
        raise DpeltError(f"expected a tag like iter-003, got {tag!r}", key="tag")
    n = int(m.group(1))
    # every precondition before anything moves: the tools, a DVC repository, the tag and its data
    for name in ("git", "dvc"):
        require_tool(name)
    if not is_git_repo(root) or not (root / ".dvc").is_dir():
        raise DpeltError("not a published run (no git repository with DVC here): nothing to restore", path=root)
    with dvc_lock(root):
        if run(["git", "rev-parse", "-q", "--verify", f"refs/tags/{tag}"], root, check=False).returncode != 0:
            raise DpeltError(f"no such tag {tag!r} (published iterations: {run(['git', 'tag', '--list', 'iter-*'], root).stdout.split()})", key="tag")
        tracked = run(["git", "ls-tree", "-r", "--name-only", tag], root).stdout.split()
        dvc_files = [f for f in tracked if f.endswith(".dvc") and (f.startswith("iter/") or f.startswith("data/"))]
        if not dvc_files:
            raise DpeltError(f"tag {tag!r} records no DVC-tracked data (iter/*.dvc, data/*.dvc)", key="tag")
        later = [d for d in iteration_dirs(root) if int(d.name) > n]
        moved = []
        attic = root / "attic" / time.strftime("%Y%m%d-%H%M%S")
        if (root / "reports").exists():  # reports of the later state: the next run rewrites them
            attic.mkdir(parents=True, exist_ok=True)
            shutil.move(str(root / "reports"), str(attic / "reports"))
        if later:
            attic.mkdir(parents=True, exist_ok=True)
            for d in later:
                shutil.move(str(d), str(attic / d.name))
                dvc = root / "iter" / f"{d.name}.dvc"
                if dvc.exists():
                    shutil.move(str(dvc), str(attic / f"{d.name}.dvc"))
                moved.append(d.name)
            log(f"moved iterations {moved} to {attic.relative_to(root)}")
        run(["git", "checkout", tag, "--"] + dvc_files + [f for f in tracked if f.startswith("manifests/")], root)
        run(["dvc", "checkout", "-q", "--force"] + dvc_files, root)
        # Snakemake's records of later jobs are stale now
        for sub in ("incomplete", "metadata"):
            shutil.rmtree(root / ".snakemake" / sub, ignore_errors=True)
        iters = [d for d in iteration_dirs(root) if int(d.name) <= n]
        _set_workflow_times(root, iters)
        log(f"restored {tag}: iterations {[d.name for d in iters]}")
        return {"tag": tag, "iterations": [d.name for d in iters], "moved_to_attic": moved}


def verify(root: str | os.PathLike = ".", tags: Sequence[str] | None = None) -> dict:
    """Recompute every published file hash; returns {tag: [mismatching or missing files]}."""
    root = Path(root).resolve()
    mdir = root / "manifests"
    paths = sorted(mdir.glob("iter-*.json")) if tags is None else [mdir / f"{t}.json" for t in tags]
    if not paths:
        raise DpeltError("no published iterations (manifests/iter-*.json) to verify", path=mdir)
    bad = {}
    for p in paths:
        if not p.exists():
            raise DpeltError("no manifest for this tag", path=p)
        mf = json.loads(p.read_text())
        wrong = []
        for rel, digest in mf["files"].items():
            f = root / rel
            if not f.exists():
                wrong.append(f"{rel}: missing")
            elif sha256(f) != digest:
                wrong.append(f"{rel}: sha256 differs")
        bad[p.stem] = wrong
    return bad
