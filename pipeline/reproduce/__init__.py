"""``dpelt reproduce [TAG]``: re-execute a published run up to TAG and compare it, file by file, with its manifests.

In a clone of a published run (git clone + ``dvc pull``), :func:`reproduce`

1. reads the manifests of every tag up to TAG (``git show TAG:manifests/iter-NNN.json``) and
   says which entries of the recorded environment differ on this machine (:mod:`.environment`);
2. re-executes the run up to TAG's iteration in a fresh work directory with the run's own
   config file (as committed at TAG) and seed (:mod:`.rerun`);
3. compares every dataset, model and result file (metrics, reports, learning curves) of those
   manifests: the re-executed file's sha256 with the manifest's, and the published copy's as
   well; what differs is described by :mod:`.compare` (arrays: max absolute difference per
   variable; models: per tensor, and the held-out errors of both). Records of the execution
   itself (wall times, cache counts) and plots are listed, not compared;
4. prints a table and writes the same as JSON (``reproduce/<TAG>.json`` by default).

``reuse_labels``: the oracle's work is taken from the published run instead of being done
again: ``data/init`` and ``data/holdout`` (oracle MD: every step's forces came from the
oracle, only every trj_freq-th frame is published) are copied, and each iteration's label
task cache is seeded with the published results of frames bit-identical to the ones the
re-execution selects (:mod:`.labels`). Training, exploration, selection and evaluation are
recomputed and compared as always.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any, Callable

from ..errors import DpeltError
from ..fileio import write_json_atomic
from ..versioning import is_git_repo, run, sha256
from . import environment, rerun
from .compare import difference, file_class, summary_line

TAG_RE = re.compile(r"^iter-(\d{3})$")
#: statuses that count as reproduced
GOOD = ("identical", "reused")


def published_tags(root: Path) -> list[str]:
    return sorted(t for t in run(["git", "tag", "--list", "iter-*"], root).stdout.split() if TAG_RE.match(t))


def read_manifest(root: Path, tag: str) -> dict:
    """The manifest of ``tag`` as committed with it."""
    proc = run(["git", "show", f"{tag}:manifests/{tag}.json"], root, check=False)
    if proc.returncode != 0:
        raise DpeltError(f"the tag {tag} has no manifests/{tag}.json", path=root, key="tag")
    return json.loads(proc.stdout)


def _load_config(workdir: Path, configfile: str) -> tuple[str, dict]:
    """(path in ``workdir``, validated config) of the run's config: the one in the published
    tree, else a file given outside it (copied into ``workdir/config``)."""
    import shutil

    import yaml

    from ..runconfig import SCHEMA, validate_schema

    if not (workdir / configfile).is_file():
        if not Path(configfile).is_file():
            raise DpeltError("the run's config file is neither in the published tree nor here", path=configfile, key="configfile")
        (workdir / "config").mkdir(exist_ok=True)
        shutil.copyfile(configfile, workdir / "config" / Path(configfile).name)
        configfile = f"config/{Path(configfile).name}"
    schema = workdir / "config" / "schema.yaml"
    return configfile, validate_schema(yaml.safe_load((workdir / configfile).read_text()), schema if schema.exists() else SCHEMA, configfile)


def _resolve(root: Path, tag: str | None) -> tuple[str, list[str]]:
    """(tag, the tags up to it): default the latest published iteration."""
    tags = published_tags(root)
    if not tags:
        raise DpeltError("no published iterations (git tags iter-NNN) in this repository", path=root)
    tag = tag or tags[-1]
    if tag not in tags:
        raise DpeltError(f"no such tag {tag!r} (published: {', '.join(tags)})", path=root, key="tag")
    return tag, [t for t in tags if t <= tag]


def _fresh(workdir: Path, resume: bool) -> None:
    if workdir.exists() and any(workdir.iterdir()) and not resume:
        raise DpeltError("the work directory exists: remove it, give another --workdir, or --resume a killed reproduction there", path=workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    ignore = workdir.parent / ".gitignore"
    if workdir.parent.name == "reproduce" and not ignore.exists():
        ignore.write_text("# dpelt reproduce: re-executions and reports, never committed\n*\n")


def _execute(root: Path, workdir: Path, configfile: str, n: int, expected: dict, reuse_labels: bool, cores: str, log: Callable) -> dict:
    """Run the re-execution; returns what the label steps did (oracle calls, seeded results)."""
    logfile = workdir / "reproduce.log"
    seeded: dict[str, Any] = {}
    if reuse_labels:
        from .labels import PublishedLabels

        copied = rerun.copy_published_data(root, workdir, expected)
        log(f"reusing the published oracle data: {', '.join(copied)}")
        published = PublishedLabels.from_run(root, [f"{j:03d}" for j in range(n + 1)])
        for j in range(n + 1):
            it = f"{j:03d}"
            rerun.snakemake(workdir, configfile, [f"iter/{it}/select/report.json"], cores, logfile)
            seeded[it] = published.seed(workdir / "iter" / it / "select" / "candidates.nc", workdir / "iter" / it / "label")
            log(f"iteration {it}: {len(seeded[it]['reused'])} published labels of bit-identical frames, {len(seeded[it]['recomputed'])} frames for the oracle")
    rerun.snakemake(workdir, configfile, rerun.iteration_targets(n), cores, logfile)
    calls = {"computed": 0, "cached": 0, "reused_known": 0}
    for j in range(n + 1):
        s = json.loads((workdir / "iter" / f"{j:03d}" / "label" / "summary.json").read_text())
        calls["computed"] += int(s.get("computed", 0))
        calls["cached"] += int(s.get("cached", 0))
        calls["reused_known"] += int(s.get("reused", 0))
    return {"oracle_calls": calls["computed"], "from_task_cache": calls["cached"], "known_labels_reused": calls["reused_known"], "seeded": seeded, "reused_data": reuse_labels}


def compare_file(rel: str, digest: str, root: Path, workdir: Path, reused: bool, holdout: Path | None) -> dict:
    """One row of the report: the re-executed and the published file against the manifest."""
    pub, rep = root / rel, workdir / rel
    pub_sha = sha256(pub) if pub.is_file() else None
    rep_sha = sha256(rep) if rep.is_file() else None
    entry: dict[str, Any] = {"path": rel, "manifest_sha256": digest, "published_sha256": pub_sha, "reproduced_sha256": rep_sha}
    if rep_sha is None:
        entry["status"], entry["note"] = "missing", "the re-execution did not produce it"
    elif pub_sha is None:
        entry["status"] = "published-missing"
        entry["note"] = ("reproduction matches the manifest" if rep_sha == digest else "reproduction differs from the manifest") + "; no published copy here (dvc pull)"
    elif pub_sha != digest:
        entry["status"] = "published-corrupt"
        entry["note"] = "the published copy differs from its manifest" + ("; the reproduction matches the manifest" if rep_sha == digest else "")
        entry["difference"] = difference(rel, pub, rep, holdout)
    elif rep_sha == digest:
        entry["status"] = "reused" if reused else "identical"
    else:
        entry["status"] = "different"
        entry["difference"] = difference(rel, pub, rep, holdout)
    return entry


def _holdout(root: Path, workdir: Path, expected: dict) -> Path | None:
    """A held-out frames file whose bytes are the manifest's (published copy first)."""
    digest = expected.get("data/holdout/frames.nc")
    for base in (root, workdir):
        p = base / "data/holdout/frames.nc"
        if digest and p.is_file() and sha256(p) == digest:
            return p
    return None


def _compare_all(root: Path, workdir: Path, expected: dict[str, str], reuse_labels: bool) -> tuple[list, list, dict]:
    """(compared rows, listed records and plots, count per status) of every manifest file."""
    holdout = _holdout(root, workdir, expected)
    reused = {rel for rel in expected if reuse_labels and rel.startswith(("data/init/", "data/holdout/"))}
    files, listed = [], []
    for rel, digest in sorted(expected.items()):
        cls = file_class(rel)
        if cls in ("record", "plot"):
            rep = workdir / rel
            listed.append({"path": rel, "class": cls, "same_bytes": rep.is_file() and sha256(rep) == digest})
        else:
            files.append({"class": cls} | compare_file(rel, digest, root, workdir, rel in reused, holdout))
    counts: dict[str, int] = {}
    for e in files:
        counts[e["status"]] = counts.get(e["status"], 0) + 1
    return files, listed, counts


def reproduce(
    root: str | Path = ".",
    tag: str | None = None,
    workdir: str | Path | None = None,
    reuse_labels: bool = False,
    cores: str = "all",
    report: str | Path | None = None,
    resume: bool = False,
    configfile: str | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Re-execute the published run in ``root`` up to ``tag`` and compare; returns the report
    (``report["identical"]``: every dataset, model and result reproduced bit for bit).
    ``configfile``: the run's config, for manifests that do not name it (published before
    dpelt recorded it; default config/config.yaml)."""
    t0 = time.monotonic()
    root = Path(root).resolve()
    if not is_git_repo(root):
        raise DpeltError("not a git repository: run `dpelt reproduce` in a clone of a published run", path=root)
    tag, tags = _resolve(root, tag)
    n = int(TAG_RE.match(tag).group(1))
    manifests = {t: read_manifest(root, t) for t in tags}
    expected: dict[str, str] = {}
    for t in tags:  # a path published again later (data/init) is compared with its latest hash
        expected.update(manifests[t]["files"])
    run_entry = manifests[tag].get("run") or {}
    if configfile and run_entry.get("config_file") and configfile != run_entry["config_file"]:
        raise DpeltError(f"{tag}'s manifest names the run's config {run_entry['config_file']!r}", path=configfile, key="configfile")
    if run_entry.get("config_outside") and not configfile:
        raise DpeltError(f"{tag} was published with a config outside the run directory ({run_entry['config_outside']}), not in the repository: give it (copied into the repository) with --configfile", key="configfile")
    configfile = run_entry.get("config_file") or configfile or "config/config.yaml"
    if not run_entry:
        log(f"{tag}'s manifest does not name the run's config (published before dpelt recorded it): using {configfile}")
    workdir = Path(workdir).resolve() if workdir else root / "reproduce" / tag
    report_path = Path(report) if report else workdir.parent / f"{workdir.name}.json"
    _fresh(workdir, resume)
    if not (resume and (workdir / "Snakefile").exists()):
        rerun.prepare_workdir(root, tag, workdir)
    configfile, config = _load_config(workdir, configfile)
    if run_entry.get("config_sha256") and sha256(workdir / configfile) != run_entry["config_sha256"]:
        raise DpeltError(f"differs from the config recorded in {tag}'s manifest", path=configfile, key="config_sha256")
    recorded = manifests[tag].get("environment")
    here = environment.describe(config)
    diffs = environment.differences(recorded, here)
    _say_environment(diffs, tag, log)
    log(f"re-executing iterations 000..{n:03d} of {configfile} (seed {config['seed']}) in {workdir}" + (" reusing the published labels" if reuse_labels else ""))
    labels = _execute(root, workdir, configfile, n, expected, reuse_labels, cores, log)
    files, listed, counts = _compare_all(root, workdir, expected, reuse_labels)
    result = {
        "tag": tag,
        "iterations": [f"{j:03d}" for j in range(n + 1)],
        "root": str(root),
        "workdir": str(workdir),
        "config_file": configfile,
        "seed": int(config["seed"]),
        "reuse_labels": reuse_labels,
        "environment": {"recorded": recorded, "here": here, "differences": diffs},
        "labels": labels,
        "files": files,
        "not_compared": listed,
        "counts": counts,
        "identical": all(e["status"] in GOOD for e in files),
        "seconds": round(time.monotonic() - t0, 1),
        "report": str(report_path),
    }
    write_json_atomic(report_path, result)
    return result


def _say_environment(diffs: list[dict], tag: str, log: Callable) -> None:
    bits = [d for d in diffs if d["affects_bits"]]
    if not bits:
        log(f"environment: as recorded in {tag}'s manifest (dpelt's code, Python, NumPy, torch, CPU instruction set, kernel, threads, oracle): bit-identical results expected")
    else:
        log(f"environment: {len(bits)} entries differ from {tag}'s manifest; bit-identity is not promised (docs/reproduce.md says what to expect):")
    for d in diffs:
        log(f"  {d['key']}: recorded {d['recorded']!r}, here {d['here']!r}" + ("" if d["affects_bits"] else " (informational)"))


def format_table(result: dict) -> str:
    """The report as a readable table (one row per dataset and model)."""
    rows = [("status", "file", "what differs")]
    for e in result["files"]:
        what = summary_line(e["difference"]) if "difference" in e else e.get("note", "")
        if "note" in e and "difference" in e:
            what = f"{e['note']}: {what}"
        rows.append((e["status"], e["path"], what))
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    lines = [f"{a:<{w0}}  {b:<{w1}}  {c}".rstrip() for a, b, c in rows]
    good = sum(result["counts"].get(s, 0) for s in GOOD)
    lab = result["labels"]
    lines.append("")
    lines.append(f"oracle calls: {lab['oracle_calls']}, labels from the task cache: {lab['from_task_cache']}, known labels reused: {lab['known_labels_reused']}")
    verdict = "IDENTICAL" if result["identical"] else "NOT IDENTICAL"
    other = result["not_compared"]
    lines.append(f"not compared: {len(other)} records of the execution and plots (wall times, cache counts; {sum(not e['same_bytes'] for e in other)} differ)")
    lines.append(f"{verdict}: {good} of {len(result['files'])} datasets, models and results reproduced ({', '.join(f'{v} {k}' for k, v in sorted(result['counts'].items()))}); {result['seconds']:.0f} s; report: {result['report']}")
    return "\n".join(lines)
