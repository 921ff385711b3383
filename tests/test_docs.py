"""
The README's configuration tables match the code's settings.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from nova.agent.options import SETTINGS as AGENT
from nova.config import Setting
from nova.server.options import SETTINGS as SERVER

README = (Path(__file__).parent.parent / "README.md").read_text()


def _rows() -> dict[str, list[str]]:
    rows = {}
    for line in README.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0].startswith("`--") and cells[1].startswith("`"):
            rows[cells[1].strip("`").split("=")[0]] = cells
    return rows


class ReadmeTableTests(SynchronousTestCase):
    def check(self, settings: tuple[Setting[Any], ...]) -> None:
        rows = _rows()
        for s in settings:
            self.assertIn(s.env, rows, f"{s.env} is missing from README.md")
            option, _env, default, _meaning = rows[s.env]
            self.assertEqual(option, f"`--{s.name}`")
            if s.default:
                self.assertEqual(default, f"`{s.default}`", f"default of {s.env}")

    def test_server_table(self) -> None:
        self.check(SERVER)

    def test_agent_table(self) -> None:
        self.check(AGENT)

    def test_no_undocumented_variables_in_tables(self) -> None:
        known = {s.env for s in SERVER + AGENT}
        for env in _rows():
            self.assertIn(env, known)


class ReadmeTestIdTests(SynchronousTestCase):
    """Every test the README cites as holding a promise exists."""

    def test_cited_tests_exist(self) -> None:
        tests = Path(__file__).parent
        cited = re.findall(r"`((?:test_\w+\.py)?)((?:::[\w*\-\[\]]+)*)`", README)
        self.assertGreater(len(cited), 20)
        current = ""
        for file, parts in cited:
            if not file and not parts:
                continue
            current = file or current
            self.assertTrue((tests / current).is_file(), f"README cites {current}, which does not exist")
            text = (tests / current).read_text()
            for part in filter(None, parts.split("::")):
                name, _, param = part.partition("[")
                found = re.search(rf"(def|class) {re.escape(name)}\b", text)
                self.assertTrue(found, f"README cites {current}::{name}, which does not exist")
                param = param.rstrip("]")
                if param and param != "*":
                    found = re.search(rf"(case_{re.escape(param)}\b|\b{re.escape(param)}\b)", text)
                    self.assertTrue(found, f"README cites {current}::{part}, a case that does not exist")
