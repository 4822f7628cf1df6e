"""The house: a short README whose links resolve, generated docs pages that match the code, a site that builds."""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README_LIMIT = 250


def _gen():
    spec = importlib.util.spec_from_file_location("docs_gen", ROOT / "docs" / "gen.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_is_short():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_LIMIT, f"README.md has {len(lines)} lines; move reference material to docs/"


def test_readme_links_resolve():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    targets = [t.split("#")[0] for t in re.findall(r"\]\(([^)\s]+)\)", text) if "://" not in t]
    assert targets, "the README links to the docs"
    missing = [t for t in targets if t and not (ROOT / t).exists()]
    assert not missing, f"README.md links to missing files: {missing}"


def test_generated_pages_are_current():
    gen = _gen()
    stale = gen.stale()
    assert not stale, f"stale generated docs pages {stale}: run `python docs/gen.py` and commit them"


def test_stale_page_is_detected(tmp_path, monkeypatch):
    gen = _gen()
    for name, render in gen.PAGES.items():
        (tmp_path / name).write_text(render(), encoding="utf-8")
    monkeypatch.setattr(gen, "DOCS", tmp_path)
    assert gen.stale() == []
    page = tmp_path / "supported-ops.md"
    page.write_text(page.read_text(encoding="utf-8").replace("| Relu |", "| Relu6 |"), encoding="utf-8")
    assert gen.stale() == ["supported-ops.md"]


def test_cli_reference_covers_every_command():
    from jacgraph.cli import parser

    page = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    commands = [name for name, _, _ in _gen()._subcommands(parser())]
    assert {"compile", "inspect", "verify"} <= set(commands)
    assert all(f"## jacgraph {name}\n" in page for name in commands)


def test_site_builds_strict(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("material")
    run = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
