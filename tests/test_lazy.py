"""Package exports load on first use: the command line and the data layer do not pay for torch."""

from __future__ import annotations

import subprocess
import sys

import pytest

import lmforge.infer
import lmforge.model
import lmforge.train


def imports_torch(code: str) -> bool:
    script = f"{code}\nimport sys\nprint('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    return out.strip() == "True"


def test_help_and_the_data_layer_do_not_import_torch() -> None:
    assert not imports_torch("from lmforge.cli import build_parser; build_parser().format_help()")
    assert not imports_torch(
        "from lmforge.data.recipe import import_step_modules; from lmforge.data.executor import LocalExecutor; "
        "assert not import_step_modules()"
    )
    assert imports_torch("from lmforge.model import Transformer")  # the check can tell


@pytest.mark.parametrize("package", [lmforge.model, lmforge.train, lmforge.infer])
def test_every_listed_export_resolves(package) -> None:
    for name in package.__all__:
        assert getattr(package, name).__name__ == name
    assert dir(package) == sorted(package.__all__)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        package.nope  # noqa: B018
