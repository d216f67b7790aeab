"""``pip install .`` gives a wheel that works outside the repository: package data included, commands run."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_wheel_runs_outside_the_repository(tmp_path: Path) -> None:
    pytest.importorskip("setuptools")
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(REPO)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert build.returncode == 0, build.stdout + build.stderr
    (wheel,) = (tmp_path / "dist").glob("lmforge-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "lmforge/serve/static/chat.html" in names
    assert not [n for n in names if n.startswith(("tests/", "benchmarks/"))]
    target = tmp_path / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(target), str(wheel)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert install.returncode == 0, install.stdout + install.stderr
    # run from an empty folder, the installed copy first on the path (dependencies from this environment)
    env = {**os.environ, "PYTHONPATH": str(target)}
    where = subprocess.run(
        [sys.executable, "-c", "import lmforge, sys; print(lmforge.__file__)"],
        cwd=tmp_path, env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert where.stdout.strip().startswith(str(target))
    for args in (["info", "gpt2"], ["demo", "--help"]):
        run = subprocess.run(
            [sys.executable, "-m", "lmforge.cli", *args], cwd=tmp_path, env=env, capture_output=True, text=True,
            timeout=120,
        )  # fmt: skip
        assert run.returncode == 0, run.stdout + run.stderr
    page = subprocess.run(
        [sys.executable, "-c", "from lmforge.serve.app import chat_page; print(len(chat_page()))"],
        cwd=tmp_path, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert page.returncode == 0 and int(page.stdout) > 1000, page.stderr
