"""The import graph as import-linter and grimp read it: the layer contract in pyproject.toml kept,
no import cycles. Both run on a copy of the package laid out as it installs (``trainer/`` and
``export/`` inside ``selfadapt_deploy/``), since grimp walks the package's own folder."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CYCLES = """
import grimp
g = grimp.build_graph("selfadapt_deploy", include_external_packages=False)
cycles = sorted({tuple(sorted((m, i))) for m in g.modules for i in g.find_modules_directly_imported_by(m)
                 if g.find_shortest_chain(importer=i, imported=m)})
print(len(g.modules), cycles)
"""


@pytest.fixture(scope="module")
def installed_layout(tmp_path_factory) -> Path:
    if shutil.which("lint-imports") is None:
        pytest.skip("import-linter is not installed (the dev extra has it)")
    root = tmp_path_factory.mktemp("layout")
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(ROOT / "selfadapt_deploy", root / "selfadapt_deploy", ignore=ignore)
    for sub in ("trainer", "export"):
        shutil.copytree(ROOT / sub, root / "selfadapt_deploy" / sub, ignore=ignore)
    shutil.copy(ROOT / "pyproject.toml", root)
    return root


def _run(cmd: list[str], root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)


def test_layer_contract_is_kept(installed_layout):
    result = _run(["lint-imports", "--no-cache"], installed_layout)
    assert result.returncode == 0 and "0 broken" in result.stdout, result.stdout[-3000:] + result.stderr
    analyzed = int(re.search(r"Analyzed (\d+) files", result.stdout).group(1))
    assert analyzed > 80  # trainer/ and export/ were part of the graph


def test_layer_contract_is_kept_in_the_checkout(installed_layout):
    """`lint-imports` as run in the checkout (trainer/ and export/ are optional layers there)."""
    result = _run(["lint-imports", "--no-cache"], ROOT)
    assert result.returncode == 0 and "0 broken" in result.stdout, result.stdout[-3000:] + result.stderr


def test_no_import_cycles(installed_layout):
    result = _run([sys.executable, "-c", CYCLES], installed_layout)
    assert result.returncode == 0, result.stderr
    modules, cycles = result.stdout.split(" ", 1)
    assert int(modules) > 80 and cycles.strip() == "[]", cycles
