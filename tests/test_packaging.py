"""Packaging: every third-party module the package imports is a declared dependency."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _declared() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"]) + [r for extra in project.get("optional-dependencies", {}).values() for r in extra]
    return {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower().replace("_", "-") for r in reqs}


def _imported() -> dict[str, str]:
    """{top-level module: first file importing it} of absolute imports in pipeline/."""
    out = {}
    for f in sorted((ROOT / "pipeline").rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else []
            for n in names:
                out.setdefault(n.split(".")[0], str(f.relative_to(ROOT)))
    return out


def test_every_imported_package_is_declared():
    dists = packages_distributions()
    declared = _declared()
    missing = {}
    for module, where in _imported().items():
        if module in sys.stdlib_module_names or module == "pipeline":
            continue
        names = {d.lower().replace("_", "-") for d in dists.get(module, [module])}
        if not names & declared:
            missing[module] = where
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"


def test_a_built_wheel_validates_a_config(tmp_path):
    """The schema ships inside the package: a wheel (a non-editable install) holds it, and the
    validator reads it from the package, not from config/ beside a checkout."""
    import subprocess
    import zipfile

    from pipeline.runconfig import schema, schema_default

    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = tmp_path.glob("dpelt-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "pipeline/schema.yaml" in names and "pipeline/model/embedding_kernel.cpp" in names
    assert not (ROOT / "config" / "schema.yaml").exists()  # one schema, in the package
    assert schema()["properties"]["label"]["properties"]["max_force"]["default"] == schema_default("label.max_force") == 50.0


def test_settings_reach_jobs_as_arguments_not_environment():
    """The workflow hands every setting to a job on its command line: no rule sets a DPELT_
    variable for its command, and no rule file changes the driver's os.environ."""
    for f in sorted((ROOT / "rules").glob("*.smk")) + [ROOT / "Snakefile"]:
        text = f.read_text()
        assert not re.search(r"\bDPELT_[A-Z_]+=", text), f
        assert "os.environ" not in text, f
