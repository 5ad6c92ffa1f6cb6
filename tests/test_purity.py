"""The pure core does no I/O of its own, and the blocking modules stay out of the async stack.

One check for every module: in a fresh interpreter, importing it loads neither aiohttp nor zeroconf, nor
asyncio unless torch brought it (`import torch` loads asyncio through unittest.mock); and the module's own
import statements name none of them (the pure core also takes no clock or socket: time is passed in).
"""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO

PURE_CORE = ["meshd.errors", "meshd.config", "meshd.identity", "meshd.core.wire", "meshd.core.replay",
             "meshd.core.codec", "meshd.core.membership", "meshd.core.averaging", "meshd.core.cohort",
             "meshd.core.stats", "meshd.core.merge"]
MESH = ["meshd.mesh.node", "meshd.mesh.link", "meshd.mesh.discovery", "meshd.mesh.transport"]
BLOCKING = ["meshd.task.models", "meshd.task.data", "meshd.task.learner", "meshd.store", "meshd.task.datasets",
            "meshd.task.checkpoints"]
ASYNC_STACK = {"asyncio", "aiohttp", "zeroconf"}


def _own_imports(module: str) -> set[str]:
    path = importlib.import_module(module).__file__
    assert path is not None
    tree = ast.parse(Path(path).read_text())
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    return names


@pytest.mark.parametrize("module", PURE_CORE + BLOCKING)
def test_module_stays_out_of_the_async_stack(module: str) -> None:
    code = (
        f"import sys, {module}\n"
        "bad = [m for m in ('aiohttp', 'zeroconf') if m in sys.modules]\n"
        "if 'asyncio' in sys.modules and 'torch' not in sys.modules:\n"
        "    bad.append('asyncio')\n"
        "print(bad)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"
    forbidden = ASYNC_STACK | ({"time", "socket"} if module in PURE_CORE else set())
    assert not _own_imports(module) & forbidden, (module, _own_imports(module) & forbidden)


@pytest.mark.parametrize("module", MESH)
def test_the_mesh_part_never_loads_torch_nor_a_task(module: str) -> None:
    """The mesh exists once per daemon and carries every task: it must not depend on any task's model code."""
    code = (
        f"import sys, {module}\n"
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith(('torch.', 'meshd.task'))))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]", r.stdout
    assert not {n for n in _own_imports(module) if n == "torch"}
