"""Every numbered scenario of the reliability test plan has a test named after its number.

The plan is ``../shared/RELIABILITY.md`` (beside the project). A scenario ``N.`` is covered by a test
function in ``tests/reliability/`` whose name starts with ``test_rNN_`` (two digits), e.g.
``test_r01_png_pixel_bomb_in_header``.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
PLAN = HERE.parents[2] / "shared" / "RELIABILITY.md"
NAME = re.compile(r"^test_r(\d{2})_")


def planned_scenarios(text: str) -> set[int]:
    return {int(m.group(1)) for m in re.finditer(r"^(\d{1,3})\. \*\*", text, flags=re.M)}


def scenarios_with_tests(folder: Path) -> dict[int, list[str]]:
    found: dict[int, list[str]] = {}
    for path in sorted(folder.glob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and (m := NAME.match(node.name)):
                found.setdefault(int(m.group(1)), []).append(f"{path.name}::{node.name}")
    return found


def test_plan_parses_to_its_scenarios() -> None:
    text = "### A. x\n\n1. **One.** a\n2. **Two.** b\n   3. not a scenario\n12. **Twelve.** c\n"
    assert planned_scenarios(text) == {1, 2, 12}


def test_every_planned_scenario_has_a_test() -> None:
    if not PLAN.is_file():
        pytest.skip(f"the test plan is not beside the project: {PLAN}")
    planned = planned_scenarios(PLAN.read_text())
    assert len(planned) > 50, "the plan lists its scenarios as '12. **Title.**' lines"
    missing = sorted(planned - scenarios_with_tests(HERE).keys())
    assert not missing, f"scenarios without a test_rNN_ test in tests/reliability: {missing}"
