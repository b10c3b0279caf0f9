"""The documentation is true of the code: the site builds, links resolve, commands and keys exist.

README.md is a newcomer's page (at most 160 lines); reference material is in docs/, built with
MkDocs (mkdocs.yml). These tests fail when a page links to nothing, when a page is left out of
the nav, when README or docs name a `dpelt` subcommand or option the CLI does not have, when
a config key in the DP-GEN tables is not in the schema, when a config example does not
validate, or when docs/config-reference.md is older than the schema.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
README_MAX_LINES = 160

FENCE = re.compile(r"^```([^\n]*)\n(.*?)^```", re.S | re.M)
INLINE = re.compile(r"`([^`\n]+)`")
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
# `dpelt SUB` at the start of a command (also .venv/bin/dpelt SUB); `dpelt[xtb]`, `cd dpelt` do not match
COMMAND = re.compile(r"(?:^|[\s;&|(/])dpelt[ \t]+([a-z][a-z-]*)")


def pages() -> list[Path]:
    return [README] + sorted(DOCS.glob("*.md"))


def code_texts(text: str) -> list[str]:
    """Fenced code blocks, then inline code spans of the prose around them."""
    blocks = [m.group(2) for m in FENCE.finditer(text)]
    prose = FENCE.sub("", text)
    return blocks + INLINE.findall(prose)


def test_mkdocs_builds_strict(tmp_path):
    """Broken links, missing anchors and pages left out of (or missing from) the nav fail the build."""
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"), "-d", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "site" / "index.html").exists()
    nav_pages = re.findall(r":\s*([\w-]+\.md)\s*$", (ROOT / "mkdocs.yml").read_text(), re.M)
    for page in nav_pages:
        assert (tmp_path / "site" / page[:-3] / "index.html").exists() or page == "index.md", page


def test_readme_is_short():
    n = len(README.read_text().splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines (at most {README_MAX_LINES}): move reference material to docs/"


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    s = re.sub(r"[`*_]", "", heading.strip().lower())
    s = re.sub(r"[^\w\- ]", "", s)
    return s.replace(" ", "-")


def test_readme_links_resolve():
    text = README.read_text()
    targets = [t for t in LINK.findall(text) if not re.match(r"[a-z]+:", t)]
    assert targets, "README.md links to nothing in the repository"
    bad = []
    for target in targets:
        path, _, anchor = target.partition("#")
        file = (ROOT / path) if path else README
        if not file.exists():
            bad.append(f"{target}: {file.relative_to(ROOT)} does not exist")
        elif anchor and file.suffix == ".md":
            anchors = {_slug(h) for h in re.findall(r"^#+\s+(.*)$", FENCE.sub("", file.read_text()), re.M)}
            if anchor not in anchors:
                bad.append(f"{target}: no heading with anchor #{anchor} in {file.relative_to(ROOT)}")
    assert not bad, "broken links in README.md:\n" + "\n".join(bad)


def _dpelt_help() -> str:
    exe = Path(sys.executable).with_name("dpelt")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "pipeline.cli"]
    proc = subprocess.run(cmd + ["--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def named_commands() -> dict[str, set[str]]:
    """{subcommand: pages} for every `dpelt SUB` in the code of README.md and docs/*.md."""
    found: dict[str, set[str]] = {}
    for page in pages():
        for code in code_texts(page.read_text()):
            for sub in COMMAND.findall(code):
                found.setdefault(sub, set()).add(page.name)
    return found


def test_named_dpelt_commands_exist():
    named = named_commands()
    assert {"resume", "check-config", "train", "export", "import", "publish", "restore"} <= set(named)
    listed = set(re.findall(r"^ {4}([a-z][a-z-]*)(?:\s|$)", _dpelt_help(), re.M))
    missing = {sub: sorted(where) for sub, where in named.items() if sub not in listed}
    assert not missing, f"`dpelt --help` lists no such subcommands: {missing}"


def _command_lines() -> list[tuple[str, str, str]]:
    """(page, subcommand, arguments) of every `dpelt SUB ...` command line shown in the docs."""
    out = []
    for page in pages():
        for code in code_texts(page.read_text()):
            for line in code.splitlines():
                line = line.split(" #")[0]
                for m in re.finditer(r"(?:^|[\s;&|(/])dpelt[ \t]+([a-z][a-z-]*)([^;&|]*)", line):
                    out.append((page.name, m.group(1), m.group(2)))
    return out


def test_named_dpelt_options_exist():
    """Every --option written after `dpelt SUB` in the docs is an option of that subcommand."""
    from pipeline.cli import build_parser

    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    bad = []
    lines = _command_lines()
    assert any("--" in args for _, _, args in lines)
    for page, sub, args in lines:
        if sub not in subparsers.choices:
            continue  # reported by test_named_dpelt_commands_exist
        known = {o for a in subparsers.choices[sub]._actions for o in a.option_strings}
        for opt in re.findall(r"(?<![\w-])(--[a-z][a-z-]*|-[a-zA-Z])\b", args):
            if opt not in known:
                bad.append(f"{page}: dpelt {sub} {opt}")
    assert not bad, "options the CLI does not have:\n" + "\n".join(sorted(set(bad)))


# repository files named in the docs (run outputs such as iter/NNN/..., and bench/work/, are not)
REPO_PATH = re.compile(r"^(?:(?:config|docs|scripts|bench|tests|rules|pipeline|\.ci)/[\w./*-]*|Makefile|Snakefile|constraints\.txt|mkdocs\.yml|pyproject\.toml|dvc\.yaml)$")


def test_named_repository_files_exist():
    """Every repository path in the code of README.md and docs/*.md exists (globs match something)."""
    bad = []
    for page in pages():
        for code in code_texts(page.read_text()):
            for token in code.split():
                token = token.strip("'\"(),;:")
                if not REPO_PATH.match(token) or token.startswith("bench/work"):
                    continue
                if not (any(ROOT.glob(token)) if "*" in token else (ROOT / token).exists()):
                    bad.append(f"{page.name}: {token}")
    assert not bad, "files named in the docs that do not exist:\n" + "\n".join(sorted(set(bad)))


def test_named_make_targets_exist():
    targets = set(re.findall(r"^([\w.-]+):", (ROOT / "Makefile").read_text(), re.M))
    named = {(page.name, t) for page in pages() for code in code_texts(page.read_text()) for t in re.findall(r"(?:^|[\s;&|(])make[ \t]+([a-z][\w-]*)", code)}
    assert {t for _, t in named} >= {"run", "test"}
    missing = sorted(f"{page}: make {t}" for page, t in named if t not in targets)
    assert not missing, "no such Makefile targets: " + ", ".join(missing)


def _schema_keys() -> tuple[set[str], set[str]]:
    """(every dotted key path of the run config schema, every key name at any depth)."""
    from pipeline.runconfig import schema

    paths: set[str] = set()
    names: set[str] = set()

    def walk(node: dict, prefix: str) -> None:
        for name, child in node.get("properties", {}).items():
            path = f"{prefix}.{name}" if prefix else name
            paths.add(path)
            names.add(name)
            walk(child, path)
            if isinstance(child.get("items"), dict):
                walk(child["items"], path)

    walk(schema(), "")
    return paths, names


def _key_table_cells(text: str) -> list[str]:
    """First cells of the rows of tables whose header's first cell is `dpelt` or `key`."""
    cells, in_table = [], False
    for line in text.splitlines():
        if not line.startswith("|"):
            in_table = False
            continue
        first = line.split("|")[1].strip()
        if not in_table:
            in_table, checked = True, first in ("dpelt", "key")
            continue
        if checked and not set(first) <= set("-: "):
            cells.append(first)
    return cells


@pytest.mark.parametrize("page", ["README.md", "docs/configuration.md"])
def test_config_tables_name_schema_keys(page):
    """The DP-GEN ↔ dpelt tables name keys the schema has (dotted: the full path)."""
    paths, names = _schema_keys()
    cells = _key_table_cells((ROOT / page).read_text())
    assert len(cells) >= 10, f"no config key table found in {page}"
    bad = []
    for cell in cells:
        for key in INLINE.findall(cell):
            key = key.replace("[]", "")
            if "." in key and key not in paths or "." not in key and key not in names:
                bad.append(key)
    assert not bad, f"{page} names config keys the schema does not have: {bad}"


def test_config_examples_validate(tmp_path, monkeypatch):
    """Every complete run config shown in the docs (a yaml block with type_map) passes validation."""
    from pipeline.runconfig import load_run_config

    monkeypatch.chdir(tmp_path)
    examples = [
        (page.name, m.group(2))
        for page in pages()
        for m in FENCE.finditer(page.read_text())
        if m.group(1).strip() == "yaml" and re.search(r"^type_map:", m.group(2), re.M)
    ]
    assert examples, "no run config example in the docs"
    for k, (page, text) in enumerate(examples):
        f = tmp_path / f"example{k}.yaml"
        f.write_text(text)
        load_run_config(f)  # raises ConfigError naming the key


def test_config_reference_is_current():
    spec = importlib.util.spec_from_file_location("gen_config_reference", DOCS / "gen_config_reference.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    assert (DOCS / "config-reference.md").read_text() == gen.current(), "docs/config-reference.md is out of date: run python docs/gen_config_reference.py"
