"""
Packaging (issue 17, item 6): the sdist and the wheel built from it, installed
(not editable) into a fresh virtualenv, run `twist novas` with NOVA's package
data, and the build says nothing deprecated.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DIST = "nova_tunnel"
# What must arrive besides the modules: the admin page, the typing marker and
# the two plugin files (`twist` finds NOVA through them).
DATA = ("nova/admin/page.html", "nova/py.typed", "twisted/plugins/nova_novas.py", "twisted/plugins/nova_novac.py")
