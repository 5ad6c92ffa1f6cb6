"""`make torch` installs the CPU build of torch whatever the index serves under the plain version.

pip is replaced by a stub (its collaborator here), which answers the dry run like a given index would and
records the real install it is then asked for: on an index that serves the CUDA build (plain PyPI: the
report lists nvidia-* packages) the CPU build comes from the PyTorch CPU index; on one that serves the CPU
wheel under the plain version (this CI machine) the plain pin is installed, with no other index.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.helpers import REPO

STUB = """#!/bin/sh
# a stand-in for `python -m pip ...` of a venv: the dry run prints a canned report, anything else is logged
shift 2  # "-m pip"
case " $* " in
  *" --dry-run "*) cat "$(dirname "$0")/report.json" ;;
  *) echo "$*" >> "$(dirname "$0")/installs.log" ;;
esac
"""


def _venv(tmp: Path, names: list[str]) -> Path:
    venv = tmp / "venv"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    python.write_text(STUB)
    python.chmod(0o755)
    report = {"version": "1", "install": [{"metadata": {"name": n, "version": "1"}} for n in names]}
    (venv / "bin" / "report.json").write_text(json.dumps(report, indent=2))
    return venv


@pytest.mark.parametrize(
    ("served", "expected_index"),
    [
        (["torch", "nvidia-cublas-cu12", "nvidia-cudnn-cu12", "sympy"], "--index-url https://download.pytorch.org/whl/cpu"),
        (["torch", "sympy", "networkx"], None),
    ],
    ids=["plain-pypi-serves-cuda", "index-serves-cpu"],
)
def test_make_torch_picks_the_cpu_build(tmp_path: Path, served: list[str], expected_index: str | None) -> None:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    venv = _venv(tmp_path, served)
    r = subprocess.run(["make", "--no-print-directory", "torch", f"VENV={venv}"], cwd=REPO, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    (install,) = (venv / "bin" / "installs.log").read_text().splitlines()
    assert "torch==2.13.0" in install
    if expected_index is None:
        assert "--index-url" not in install and "CPU build" in r.stdout
    else:
        assert expected_index in install and "serves the CUDA build" in r.stdout
