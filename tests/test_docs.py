"""Every pointer a user follows resolves: relative links (and their #anchors) in README.md and
docs/**/*.md, and every `docs/...` mention in a --help text, which must hold for an installed
package too (the wheel ships the four layers and their configs, no docs/ folder)."""
import argparse
import re
from pathlib import Path

import pytest

from capfilt.jobs.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
MARKDOWN = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation but - and _ dropped, spaces to -."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading: its text
    return re.sub(r"[^\w\- ]", "", text.replace("`", "").strip().lower()).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in FENCE.sub("", path.read_text(encoding="utf-8")).splitlines():
        match = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            slug = _slug(match.group(1))
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def _links(path: Path) -> list[str]:
    return [t for t in LINK.findall(FENCE.sub("", path.read_text(encoding="utf-8")))
            if not re.match(r"[A-Za-z][A-Za-z0-9+.-]*:", t)]  # http:, mailto:, ...: not local


def test_slugs_follow_github():
    assert _slug("Incremental runs, crashes and `--overwrite`") == "incremental-runs-crashes-and---overwrite"
    assert _slug("Runners and performance") == "runners-and-performance"
    assert _slug("1. Tiny models (synthetic world)") == "1-tiny-models-synthetic-world"


@pytest.mark.parametrize("doc", MARKDOWN, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_and_anchor_resolves(doc):
    broken = []
    for target in _links(doc):
        file, _, anchor = target.partition("#")
        dest = (doc.parent / file).resolve() if file else doc
        if not dest.exists():
            broken.append(f"{target}: no such file {dest.relative_to(REPO) if REPO in dest.parents else dest}")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target}: {dest.name} has no heading #{anchor}")
    assert broken == []


# Markdown files the commands write (bootstrap's OUT/report.md), named in the docs as outputs.
WRITTEN = {"report.md"}


@pytest.mark.parametrize("doc", MARKDOWN, ids=lambda p: str(p.relative_to(REPO)))
def test_every_markdown_file_a_doc_names_exists(doc):
    """Also outside links: `DESIGN.md`, named as if the project had one, is a pointer too."""
    text = FENCE.sub("", doc.read_text(encoding="utf-8"))
    missing = sorted({name for name in re.findall(r"(?<![\w/.-])([\w./-]+\.md)\b", text)
                      if Path(name).name not in WRITTEN
                      and not any((root / name).exists() for root in (doc.parent, REPO, REPO / "docs"))})
    assert missing == []


def _help_texts(parser: argparse.ArgumentParser, where: str):
    yield f"{where} (description)", parser.description or ""
    yield f"{where} (epilog)", parser.epilog or ""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:
                yield f"{where} {choice.dest} (summary)", choice.help or ""
            for name, sub in action.choices.items():
                yield from _help_texts(sub, f"{where} {name}")
        else:
            yield f"{where} {'/'.join(action.option_strings) or action.dest}", action.help or ""


def test_no_help_text_points_to_docs_an_installed_package_lacks():
    texts = list(_help_texts(build_parser(), "capfilt"))
    assert len(texts) > 200 and any("--precision" in where for where, _ in texts)  # every command's options
    pointers = [f"{where}: {m}" for where, text in texts for m in re.findall(r"\bdocs/[\w./-]*", text)]
    assert pointers == []
