"""docs/design.md §11 names every module and package under fastgeffect/ with what it holds: a new
module that the design does not place fails here, so the map of the package cannot fall behind it."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fastgeffect"
DESIGN = ROOT / "docs" / "design.md"


def structure_section() -> str:
    text = DESIGN.read_text(encoding="utf-8")
    start = re.search(r"^## 11\. .*$", text, re.MULTILINE)
    assert start, "docs/design.md has no §11"
    end = re.search(r"^## \d+\. ", text[start.end():], re.MULTILINE)
    return text[start.end(): start.end() + end.start() if end else len(text)]


def bullets(section: str):
    """The section's list items, continuation lines joined."""
    items, current = [], None
    for line in section.splitlines():
        if line.startswith("- "):
            current = [line]
            items.append(current)
        elif current is not None and line.startswith("  "):
            current.append(line)
        else:
            current = None
    return [" ".join(x) for x in items]


def modules():
    """Every module and package of fastgeffect/ as (package path, file or folder name), e.g.
    ("driver/", "config.py"), ("", "unlearn.py"), ("", "driver/"). __init__.py is its package."""
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        if "__pycache__" in rel.parts or rel.name == "__init__.py":
            continue
        out.append(("".join(p + "/" for p in rel.parts[:-1]), rel.name))
    for init in sorted(PACKAGE.rglob("__init__.py")):
        rel = init.parent.relative_to(PACKAGE)
        if rel.parts:
            out.append(("".join(p + "/" for p in rel.parts[:-1]), rel.parts[-1] + "/"))
    return out


def placed(package: str, name: str, section: str, items) -> bool:
    """Named with its path (`driver/config.py`), or by its name in the item that names its package."""
    if f"`{package}{name}`" in section:
        return True
    if not package:
        return False
    return any(f"`{package}`" in item and f"`{name}`" in item for item in items)


def test_design_section_11_places_every_module_and_package():
    section = structure_section()
    items = bullets(section)
    missing = [p + n for p, n in modules() if not placed(p, n, section, items)]
    assert not missing, f"docs/design.md §11 does not say what these hold: {missing}"


def test_the_check_can_fail():
    # a module named nowhere is reported; one named in its package's item is not
    items = bullets("- `driver/` the flow: `study.py` the study\n  and `cli.py`.\n")
    assert placed("driver/", "cli.py", "", items) and not placed("driver/", "config.py", "", items)
    assert not placed("", "unlearn.py", "`driver/`", items) and placed("", "unlearn.py", "`unlearn.py`", [])
