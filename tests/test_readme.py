"""The README's set-up and the library page's example work as printed."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()
LIBRARY = (REPO / "docs" / "library.md").read_text()


def test_library_example_runs_and_does_what_it_says() -> None:
    blocks = [
        block
        for block in re.findall(r"```python\n(.*?)```", LIBRARY, flags=re.S)
        if "class ChargeService" in block
    ]
    assert len(blocks) == 1, "docs/library.md shows the library once"
    namespace: dict[str, Any] = {"__name__": "readme"}
    exec(compile(blocks[0], "docs/library.md", "exec"), namespace)
    assert namespace["result"].value["charged"] == 12.5
    assert namespace["errors"] == ["Amount must be positive"]
    assert len(namespace["successes"]) == 1


def test_readme_opens_with_the_two_set_up_commands() -> None:
    setup = README.split("## Set up", 1)[1].split("##", 1)[0]
    commands = [line.split("#")[0].strip() for line in re.findall(r"^make .*$", setup, re.M)]
    assert commands == ["make run", "make test"]
