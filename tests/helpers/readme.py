"""The README's install line: the one line of the first ``bash`` block of its Quick start, which
installs everything the test suite needs (CI runs the same line: tests/test_docs.py)."""
import re
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_install_line() -> str:
    quick_start = README.read_text(encoding="utf-8").split("\n## Quick start\n", 1)[1]
    lines = re.search(r"```bash\n(.*?)```", quick_start, re.DOTALL).group(1).strip().splitlines()
    assert len(lines) == 1, f"the README's install line is one line, not {len(lines)}"
    return lines[0]
