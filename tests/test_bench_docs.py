"""docs/benchmarks.md is generated from bench/results/*.json (bench/make_docs.py) and the bench
harness's round bookkeeping. Standard library only: no model is built here."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(str(ROOT / "bench"))


make_docs = _load("make_docs")
harness = _load("harness")


def test_checked_in_benchmarks_page_is_what_the_generator_writes():
    """Regenerate with `python bench/make_docs.py` after changing bench/results/*.json."""
    assert (ROOT / "docs" / "benchmarks.md").read_text() == make_docs.render(ROOT / "bench" / "results")


def test_page_follows_the_json(tmp_path):
    results = tmp_path / "results"
    shutil.copytree(ROOT / "bench" / "results", results)
    before = make_docs.render(results)
    res = {"benchmark": "x", "command": "python bench/x.py", "date": "2026-12-08 03:00 UTC", "git_revision": "abc",
           "machine": {"cpus": 2, "cpus_available": 2, "load_avg": [1.0, 2.0, 3.0], "load_avg_after": [4.0, 5.0, 6.0]},
           "figure": {"steps_per_s": 12.3456789}, "rounds": list(range(20))}
    (results / "zz_new.json").write_text(json.dumps(res))
    after = make_docs.render(results)
    assert after.startswith(before)
    new = after[len(before):]
    assert "## zz_new" in new and "| figure.steps_per_s | 12.35 |" in new
    assert "[4, 5, 6]" in new and "abc" in new
    assert "rounds" not in new  # per-round detail stays in the JSON
    out = tmp_path / "benchmarks.md"
    assert make_docs.main(["--results", str(results), "--out", str(out), "--check"]) == 1
    assert make_docs.main(["--results", str(results), "--out", str(out)]) == 0
    assert out.read_text() == after
    assert make_docs.main(["--results", str(results), "--out", str(out), "--check"]) == 0


def test_water_and_oversubscription_tables():
    bm = {"all": [2.0, 1.0, 3.0], "best": 3.0, "median": 2.0}
    water = {"columns": ["dpelt", "deepmd-tf"], "speed_keys": ["train_steps_per_s"],
             "speed": {"dpelt": {"train_steps_per_s": bm}, "deepmd-tf": {"train_steps_per_s": {"best": 1.5, "median": 1.0}}},
             "ratios": {"dpelt / deepmd-tf": {"train_steps_per_s": {"best": 2.0, "median": 2.0}}}}
    text = make_docs.render_water(water)
    assert "| train_steps_per_s | 3 / 2 | 1.5 / 1 |" in text
    assert "| dpelt / deepmd-tf | train_steps_per_s | 2 / 2 |" in text
    over = {"copies": 2, "threads": 2, "seconds": 10, "summary": {"train/dpelt": {"alone_steps_per_s": bm, "per_copy_steps_per_s": bm, "ratio": {"best": 0.5, "median": 0.45}}}}
    assert "| train/dpelt | 3 / 2 | 3 / 2 | 0.5 / 0.45 | – | – |" in make_docs.render_oversubscription(over)


def test_harness_rounds_rotate_and_summarise():
    assert [harness.rotated(["a", "b", "c"], r) for r in range(4)] == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]]
    calls = []
    rounds = harness.interleaved({"a": lambda r: calls.append(("a", r)) or {"v": 1.0 + r}, "b": lambda r: calls.append(("b", r)) or {"v": 2.0}}, 2, log=lambda s: None)
    assert calls == [("a", 0), ("b", 0), ("b", 1), ("a", 1)]
    summary = harness.summarise(rounds, ["v"])
    assert summary["a"]["v"] == {"all": [1.0, 2.0], "best": 2.0, "median": 1.5}
    assert harness.ratios(summary, "a", "b") == {"v": {"best": 1.0, "median": 0.75}}
    assert harness.best_median([3.0, 1.0, 2.0], larger_is_better=False)["best"] == 1.0
    assert harness.summarise(rounds, ["v"], smaller_is_better=("v",))["a"]["v"]["best"] == 1.0


def test_results_file_carries_provenance(tmp_path):
    res = harness.new_result("x", "python bench/x.py", 2, extra=1)
    assert {"date", "git_revision", "machine", "threads"} <= set(res) and res["extra"] == 1
    path = harness.write_result(tmp_path / "x.json", res)
    back = json.loads(path.read_text())
    assert back["git_revision"] != "unknown" and back["machine"]["cpus_available"] >= 1
    assert "finished" in back and len(back["machine"]["load_avg_after"]) == 3


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "bench").glob("*.py")) + sorted("studies/" + p.name for p in (ROOT / "bench" / "studies").glob("*.py")))
def test_bench_index_lists_every_script(script):
    """bench/README.md is the index: a script it does not list is unmaintained."""
    assert f"`{script}`" in (ROOT / "bench" / "README.md").read_text()
