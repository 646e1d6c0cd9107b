"""The documentation's references resolve: every "docs/..." path named in the package, csrc/,
tests, bench, the README and docs/ is a tracked file (and every "#anchor" cited with it is a
heading of that file), every relative link of the Markdown files lands on a tracked file and
heading, and nothing cites the contract under a name that is not in the repository (the contract
is docs/design.md)."""

import os
import re
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCANNED = ("README.md", "docs/", "dct_kernels/", "csrc/", "tests/", "bench/", "scripts/")
TEXT = (".py", ".md", ".sh", ".h", ".cuh", ".cu", ".cpp", ".txt", ".toml", ".cfg")
THIS = "tests/test_docs.py"

# "docs/<file>.md" optionally followed by "#anchor", as code and prose cite it.
DOCS_REF = re.compile(r"(?<![\w./-])docs/([\w./-]+?\.md)(#[\w-]+)?")
# Markdown links [text](target); targets with a scheme (http:, mailto:) are not ours.
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
# Names for the contract that no tracked file has, and section numbers it does not have
# ("docs/design.md §4": its sections are cited by name or anchor).
STALE = re.compile(r"\bDESIGN(\.md\b|'s\b| ?§| section\b)|design\.md\)?\s*§")


def _tracked():
    """The files git tracks (added but uncommitted ones included, deleted ones not), or None
    outside a git checkout."""
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True,
                             check=True, timeout=60).stdout.decode()
    except (OSError, subprocess.SubprocessError):
        return None
    return {f for f in out.split("\0") if f and os.path.exists(os.path.join(ROOT, f))}


TRACKED = _tracked()


def _scanned_files():
    if not TRACKED:
        pytest.skip("not a git checkout: which files are tracked is unknown")
    return sorted(f for f in TRACKED if f.startswith(SCANNED) and f.endswith(TEXT)
                  and not f.startswith("bench/results/"))


def _read(path):
    with open(os.path.join(ROOT, path), encoding="utf-8", errors="replace") as f:
        return f.read()


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lowercase, punctuation other than - and _ dropped,
    spaces to hyphens (inline code and emphasis markers dropped with the punctuation)."""
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors_of(markdown: str) -> set:
    """The anchors of a Markdown text's headings (those inside code fences are not headings;
    a repeated heading gets -1, -2, ... as on GitHub)."""
    found, seen, fenced = set(), {}, False
    for line in markdown.splitlines():
        if line.lstrip().startswith(("```", "~~~")):
            fenced = not fenced
            continue
        match = None if fenced else re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            slug = _slug(match.group(1))
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            found.add(slug if n == 0 else f"{slug}-{n}")
    return found


def test_slugs_follow_github():
    text = "# A b\n## `select_threshold`\n```\n# not a heading\n```\n## DCT-DP (data parallel)\n" \
           "## A b\n### End to end: hybrid-parallel DLRM\n"
    assert anchors_of(text) == {"a-b", "select_threshold", "dct-dp-data-parallel", "a-b-1",
                                "end-to-end-hybrid-parallel-dlrm"}


def _problem(target_file: str, anchor: str, where: str):
    if target_file not in TRACKED:
        return f"{where}: {target_file} is not a tracked file"
    if anchor and anchor[1:] not in anchors_of(_read(target_file)):
        return f"{where}: {target_file} has no heading with the anchor {anchor}"
    return None


def test_docs_references_resolve():
    files = _scanned_files()
    problems, seen = [], 0
    for path in files:
        for number, line in enumerate(_read(path).splitlines(), 1):
            for match in DOCS_REF.finditer(line):
                target = "docs/" + match.group(1)
                seen += 1
                problem = _problem(target, match.group(2) or "", f"{path}:{number}")
                if problem:
                    problems.append(problem)
    assert seen >= 10, f"only {seen} docs/ references found: is the scan looking at the files?"
    assert not problems, "\n".join(problems)


def test_markdown_links_resolve():
    problems, seen = [], 0
    for path in _scanned_files():
        if not path.endswith(".md"):
            continue
        base = os.path.dirname(path)
        fenced = False
        for number, line in enumerate(_read(path).splitlines(), 1):
            if line.lstrip().startswith(("```", "~~~")):
                fenced = not fenced
            if fenced:
                continue
            for match in LINK.finditer(line):
                target = match.group(1)
                if re.match(r"^[a-z][a-z0-9+.-]*:", target):
                    continue
                seen += 1
                file_part, _, anchor = target.partition("#")
                resolved = os.path.normpath(os.path.join(base, file_part)) if file_part \
                    else path
                problem = _problem(resolved.replace(os.sep, "/"), "#" + anchor if anchor else "",
                                   f"{path}:{number}")
                if problem:
                    problems.append(problem)
    assert seen >= 3, f"only {seen} relative links found"
    assert not problems, "\n".join(problems)


def test_the_contract_is_cited_as_docs_design_md():
    """"DESIGN.md" is not in the repository, nor are numbered sections: cite docs/design.md
    and its section names."""
    files = _scanned_files()
    assert "docs/design.md" in TRACKED
    problems = [f"{path}:{number}: {line.strip()}"
                for path in files if path != THIS
                for number, line in enumerate(_read(path).splitlines(), 1)
                if STALE.search(line)]
    assert not problems, "cite docs/design.md instead:\n" + "\n".join(problems)
