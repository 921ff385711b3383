"""
Packaging (issue 17, item 6): the sdist and the wheel built from it, installed
(not editable) into a fresh virtualenv, run `twist novas` with NOVA's package
data, and the build says nothing deprecated.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

import nova

ROOT = Path(__file__).resolve().parent.parent
DIST = "nova_tunnel"
# What must arrive besides the modules: the admin page, the typing marker and
# the two plugin files (`twist` finds NOVA through them).
DATA = ("nova/admin/page.html", "nova/py.typed", "twisted/plugins/nova_novas.py", "twisted/plugins/nova_novac.py")


def _source_copy(dest: Path) -> Path:
    """The committed files only, so a build leaves nothing in the work tree."""
    files = subprocess.run(
        ["git", "-C", str(ROOT), "ls-files", "-z"], capture_output=True, check=True, timeout=60
    ).stdout.split(b"\0")
    for name in filter(None, files):
        source = ROOT / os.fsdecode(name)
        if source.is_file():
            target = dest / os.fsdecode(name)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(source.read_bytes())
    return dest


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("NOVAS_", "NOVAC_", "PYTHON", "VIRTUAL_ENV"))}


@pytest.mark.integration
def test_sdist_and_wheel_install_into_a_fresh_virtualenv_and_run(tmp_path: Path) -> None:
    src, dist = _source_copy(tmp_path / "src"), tmp_path / "dist"
    # sdist, then the wheel built from that sdist (what `pip install` of the sdist would do).
    built = subprocess.run(
        [sys.executable, "-m", "build", "--outdir", str(dist), str(src)],
        capture_output=True,
        text=True,
        timeout=300,
        env=_clean_env(),
    )
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    output = built.stdout + built.stderr
    assert "deprecat" not in output.lower(), [line for line in output.splitlines() if "eprecat" in line]
    [sdist] = dist.glob(f"{DIST}-{nova.__version__}.tar.gz")
    [wheel] = dist.glob(f"{DIST}-{nova.__version__}-py3-none-any.whl")
    with tarfile.open(sdist) as tar:
        in_sdist = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    with zipfile.ZipFile(wheel) as whl:
        in_wheel = set(whl.namelist())
    for name in DATA:
        assert name in in_sdist, f"{name} is not in the sdist"
        assert name in in_wheel, f"{name} is not in the wheel"
    assert not any(name.startswith("twisted/plugins/dropin") or name == "twisted/__init__.py" for name in in_wheel)

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    install = subprocess.run(
        [str(venv / "bin" / "pip"), "install", "--quiet", str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
        env=_clean_env(),
    )
    assert install.returncode == 0, install.stderr[-3000:]

    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        # Outside the source tree, so only the installed copy can be imported.
        return subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=tmp_path, env=_clean_env())

    help_ = run(str(venv / "bin" / "twist"), "novas", "--help")
    assert help_.returncode == 0, help_.stderr
    assert "--agent-token" in help_.stdout and "NOVAS_AGENT_TOKEN" in help_.stdout
    assert "Traceback" not in help_.stdout + help_.stderr
    version = run(str(venv / "bin" / "twist"), "novac", "--version")
    assert version.stdout.strip() == f"novac (NOVA) {nova.__version__}"
    where = run(
        str(venv / "bin" / "python"),
        "-c",
        "import nova, importlib.resources as r; print(nova.__file__);"
        " print(r.files('nova.admin').joinpath('page.html').read_text()[:15])",
    )
    assert where.returncode == 0, where.stderr
    module, page = where.stdout.splitlines()
    assert Path(module).is_relative_to(venv), module  # not the work tree
    assert page.lower().startswith("<!doctype html")

    # demo.sh's editable install, in its default mode: twist still finds the plugins.
    editable = subprocess.run(
        [str(venv / "bin" / "pip"), "install", "--verbose", "--no-deps", "--editable", str(src)],
        capture_output=True,
        text=True,
        timeout=300,
        env=_clean_env(),
    )
    assert editable.returncode == 0, editable.stderr[-3000:]
    assert "deprecat" not in (editable.stdout + editable.stderr).lower(), editable.stdout[-3000:]
    assert "--agent-token" in run(str(venv / "bin" / "twist"), "novas", "--help").stdout
    module = run(str(venv / "bin" / "python"), "-c", "import nova; print(nova.__file__)").stdout.strip()
    assert Path(module).is_relative_to(src), module
