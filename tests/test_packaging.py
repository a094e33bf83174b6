"""What a pip user gets: every imported distribution declared (and bounded), one version, a wheel
that carries its data files and nothing but the batchrun package."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

import batchrun

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "batchrun"


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _requirement_name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[(]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _imported_top_level_names() -> set[str]:
    names = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {"batchrun"}


def test_every_imported_distribution_is_declared():
    declared = {_requirement_name(r) for r in _pyproject()["project"]["dependencies"]}
    dists = importlib.metadata.packages_distributions()
    missing = {}
    for name in sorted(_imported_top_level_names()):
        if name == "tomli":  # the Python 3.10 fallback for tomllib (declared with a marker)
            continue
        owners = {d.lower().replace("_", "-") for d in dists.get(name, [])}
        assert owners, f"{name} is imported by batchrun but no installed distribution provides it"
        if not owners & declared:
            missing[name] = sorted(owners)
    assert not missing, f"imported but not in [project] dependencies: {missing}"


def test_every_dependency_has_an_upper_bound_below_its_next_major():
    project = _pyproject()["project"]
    requirements = project["dependencies"] + [r for extra in project["optional-dependencies"].values()
                                              for r in extra]
    unbounded = [r for r in requirements if not re.search(r"<\s*\d", r.split(";")[0])]
    assert not unbounded, f"no upper bound: {unbounded}"


def test_the_version_has_one_source():
    project = _pyproject()["project"]
    assert "version" not in project and "version" in project["dynamic"]
    assert _pyproject()["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "batchrun.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+\S*", batchrun.__version__)


def test_the_workers_settings_of_a_checkout_are_the_installed_ones():
    import batchrun.runner.rq_settings as installed
    import workers.settings as checkout

    assert (checkout.REDIS_URL, checkout.QUEUES) == (installed.REDIS_URL, installed.QUEUES)
    assert installed.QUEUES == ["batchrun"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    """A wheel built from a copy of the tree (building in place would leave build/ and egg-info)."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "src"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", "__pycache__", "*.pyc", "build", "dist", "*.egg-info", ".pytest_cache", ".venv"))
    out = tmp / "dist"
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(out), str(source)],
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        if re.search(r"No matching distribution|Could not find a version|connection|Network", proc.stderr, re.I):
            pytest.skip(f"no build backend to be had here (offline?): {proc.stderr.strip()[-300:]}")
        pytest.fail(f"pip wheel failed:\n{proc.stderr}")
    (path,) = out.glob("batchrun-*.whl")
    with zipfile.ZipFile(path) as whl:
        yield whl


def test_the_wheel_ships_the_data_files_and_only_the_batchrun_package(wheel):
    names = set(wheel.namelist())
    lua = {p.relative_to(ROOT).as_posix() for p in (PACKAGE / "state" / "lua").glob("*.lua")}
    assert lua and lua <= names, sorted(lua - names)
    for data in ("batchrun/policy/prices.toml", "batchrun/py.typed", "batchrun/runner/rq_settings.py",
                 "batchrun/dashboard/page.html"):
        assert data in names
    top = {n.split("/")[0] for n in names}
    dist_info = {t for t in top if t.endswith(".dist-info")}
    assert top - dist_info == {"batchrun"}, sorted(top)  # no workers/, tests/ or bench/
    (info,) = dist_info
    assert f"{info}/licenses/LICENSE" in names


def test_the_wheel_metadata(wheel):
    (meta_name,) = [n for n in wheel.namelist() if n.endswith(".dist-info/METADATA")]
    meta = wheel.read(meta_name).decode()
    assert f"\nVersion: {batchrun.__version__}\n" in meta
    assert "\nLicense-Expression: MIT\n" in meta
    assert "Project-URL: Homepage, https://github.com/batchrun/batchrun" in meta
    requires = {_requirement_name(line.split(":", 1)[1].strip()) for line in meta.splitlines()
                if line.startswith("Requires-Dist:") and "extra ==" not in line}
    assert {"httpx2", "yarl", "openai", "aiohttp"} <= requires
    entry_points = next(n for n in wheel.namelist() if n.endswith(".dist-info/entry_points.txt"))
    assert "batchrun = batchrun.cli.main:main" in wheel.read(entry_points).decode()
