"""The README and docs/ stay true: every relative link resolves, the README stays short, names the two
commands near the top and every `kiln` subcommand, and nothing points outside the repo."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOC_FILES = [README, *sorted((ROOT / "docs").glob("*.md"))]

# [text](target) or [text](target "title"); images ![alt](target) match too. Fenced code is skipped first.
LINK = re.compile(r"\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`[^`\n]*`")


def _links(text: str) -> list[str]:
    prose = INLINE_CODE.sub("", FENCE.sub("", text))
    return LINK.findall(prose)


def _is_external(target: str) -> bool:
    return target.startswith(("http://", "https://", "mailto:")) or target.startswith("#")


def test_docs_exist():
    assert README.is_file()
    names = {p.name for p in DOC_FILES}
    for name in ("design.md", "text.md", "generative.md", "detection.md", "operations.md"):
        assert name in names, f"docs/{name} is missing"


@pytest.mark.parametrize("doc", DOC_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(doc: Path):
    broken = []
    for target in _links(doc.read_text(encoding="utf-8")):
        if _is_external(target):
            continue
        path = target.split("#", 1)[0]
        resolved = (doc.parent / path).resolve()
        if not resolved.exists():
            broken.append(target)
        elif ROOT not in (resolved, *resolved.parents):
            broken.append(f"{target} (outside the repo)")
    assert not broken, f"{doc.relative_to(ROOT)}: broken links: {broken}"


@pytest.mark.parametrize("doc", DOC_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_shared_paths(doc: Path):
    outside = "../" + "shared"  # spelled in two parts so this test is not itself a mention
    assert outside not in doc.read_text(encoding="utf-8"), f"{doc.relative_to(ROOT)} mentions {outside}"


def test_readme_is_short_and_leads_with_the_two_commands():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines (at most 200)"
    head = "\n".join(lines[:60])
    assert "make run" in head, "README.md must mention `make run` in its first 60 lines"
    assert "make test" in head, "README.md must mention `make test` in its first 60 lines"


def _kiln_subcommands() -> set[str]:
    from flows.cli import build_parser

    parser = build_parser()
    subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert subparsers, "flows.cli.build_parser() defines no subcommands"
    return {name for action in subparsers for name in action.choices}


def test_readme_names_every_kiln_subcommand():
    text = README.read_text(encoding="utf-8")
    commands = _kiln_subcommands()
    missing = sorted(c for c in commands if not re.search(rf"\bkiln {re.escape(c)}\b", text))
    assert not missing, f"README.md does not name: {', '.join('kiln ' + c for c in missing)}"
