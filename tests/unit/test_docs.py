"""The README stays a short front page, and every relative link in it and in docs/ resolves."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
README_MAX_BYTES = 10 * 1024

_FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.M | re.S)
_CODE_SPAN = re.compile(r"(`+)(?!`).+?(?<!`)\1(?!`)", re.S)
_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t#]*$", re.M)
_EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.I)  # http:, https:, mailto:, ...


def markdown_files() -> list[Path]:
    return [README, *sorted((REPO / "docs").rglob("*.md"))]


def _without_code(text: str) -> str:
    """The text with fenced blocks and code spans blanked (their brackets and #s are not Markdown)."""
    text = _FENCE.sub(lambda m: "\n" * m.group().count("\n"), text)
    return _CODE_SPAN.sub("", text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, punctuation but ``-`` and ``_`` dropped, spaces to ``-``."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading anchors by its text
    text = re.sub(r"[^\w\- ]", "", text.lower().replace("`", ""))
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every heading anchor of a Markdown text, with GitHub's ``-1``, ``-2`` suffixes for repeats."""
    found: set[str] = set()
    seen: dict[str, int] = {}
    for heading in _HEADING.findall(re.sub(_FENCE, "", text)):
        base = slug(heading)
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def broken_links(path: Path, text: str | None = None) -> list[str]:
    """The relative links of one Markdown file (``text`` if given) whose file or heading is missing."""
    source = path.read_text() if text is None else text
    problems: list[str] = []
    for target in _LINK.findall(_without_code(source)):
        if _EXTERNAL.match(target):
            continue  # external links are not fetched
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        if not linked.exists():
            problems.append(f"{path.name}: {target}: no such file")
        elif anchor and linked.is_file() and linked.suffix == ".md":
            linked_text = source if linked == path else linked.read_text()
            if anchor not in anchors(linked_text):
                problems.append(f"{path.name}: {target}: no heading #{anchor}")
    return problems


def test_the_readme_is_short() -> None:
    size = len(README.read_bytes())
    assert size <= README_MAX_BYTES, f"README.md is {size} bytes; move reference material into docs/"


def test_the_readme_keeps_the_two_commands() -> None:
    readme = README.read_text()
    assert "make demo" in readme and "make test" in readme


def test_every_relative_link_resolves() -> None:
    files = markdown_files()
    assert len(files) > 1
    problems = [problem for path in files for problem in broken_links(path)]
    assert not problems, "\n".join(problems)


def test_the_readme_links_every_docs_page() -> None:
    readme = README.read_text()
    for page in sorted((REPO / "docs").rglob("*.md")):
        assert f"]({page.relative_to(REPO).as_posix()}" in readme, f"README does not link {page}"


def test_the_link_checker_reports_a_broken_file_and_a_broken_anchor(tmp_path: Path) -> None:
    (tmp_path / "other.md").write_text("# Other page\n\n## A `code` heading: here\n")
    page = tmp_path / "page.md"
    page.write_text("# Page\n")
    text = (
        "# Page\n\n## Local section\n\n"
        "[fine](other.md#a-code-heading-here) [fine too](#local-section) [web](https://example.invalid/x)\n"
        "[gone](missing.md) [bad anchor](other.md#nowhere) [bad local](#not-here)\n"
        "`[in code](ignored.md)`\n\n```\n[in a block](ignored-too.md)\n```\n"
    )
    assert broken_links(page, text) == [
        "page.md: missing.md: no such file",
        "page.md: other.md#nowhere: no heading #nowhere",
        "page.md: #not-here: no heading #not-here",
    ]
