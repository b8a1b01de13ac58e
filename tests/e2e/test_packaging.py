"""What a wheel install gets: the presets inside the package, triton as an extra only."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")


def test_triton_is_an_extra_not_a_hard_dependency():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not any(dep.startswith("triton") for dep in project["dependencies"])
    extras = project["optional-dependencies"]
    assert any(dep.startswith("triton") for dep in extras["triton"])
    assert any(dep.startswith("triton") for dep in extras["dev"])  # CPU users get it for the interpreter tests


def test_presets_live_inside_the_package():
    from vlmfix import methods
    from vlmfix.eval.tasks import CONFIG_DIR

    pkg = Path(importlib.util.find_spec("vlmfix").origin).parent
    assert CONFIG_DIR.is_relative_to(pkg) and methods.PRESET_DIR.is_relative_to(pkg)
    assert "pope_random" in {p.stem for p in CONFIG_DIR.glob("*.yaml")}
    assert "vcd" in methods.presets()
    assert methods.from_yaml("vcd") == [methods.get("vcd")()]  # a shipped preset by name


@pytest.mark.slow
def test_wheel_ships_the_presets_and_they_load_from_it(tmp_path):
    if importlib.util.find_spec("setuptools") is None:
        pytest.skip("setuptools is not installed, so no wheel can be built offline")
    src = tmp_path / "src"  # a clean copy: building in the checkout would leave build/ behind
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "vlmfix", src / "vlmfix", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(src)],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, PIP_NO_INDEX="1"),
    )
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = tmp_path.glob("vlmfix-*.whl")
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        assert "vlmfix/configs/eval/pope_random.yaml" in names and "vlmfix/configs/methods/vcd.yaml" in names
        assert "vlmfix/configs/bench/decode.yaml" in names and "vlmfix/configs/bench/tiny.yaml" in names
        z.extractall(site)  # a wheel is a zip: unpacked, it is the installed package
    code = (
        "import vlmfix, sys\n"
        "assert vlmfix.__file__.startswith(sys.argv[1]), vlmfix.__file__\n"
        "from vlmfix.eval.tasks import load_task_config\n"
        "cfg = load_task_config('pope_random')\n"
        "assert cfg['split'] == 'random' and cfg['task'] == 'pope', cfg\n"
        "from vlmfix import methods\n"
        "assert methods.parse([], ['vcd'])[0] == methods.get('vcd')()\n"
        "from vlmfix.bench import load_suite\n"
        "assert load_suite('tiny').models == ('tiny',) and load_suite(None).name == 'decode'\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(site)
    run = subprocess.run(
        [sys.executable, "-c", code, str(site)], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120
    )
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-2000:]


def test_reference_tests_say_where_they_look(monkeypatch, tmp_path):
    monkeypatch.setenv("VLMFIX_REFERENCE", str(tmp_path / "nowhere"))
    for name in ("test_reference_pope", "test_reference_chair"):
        spec = importlib.util.spec_from_file_location(f"_{name}", ROOT / "tests" / "integration" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        (mark,) = [m for m in (module.pytestmark if isinstance(module.pytestmark, list) else [module.pytestmark])]
        reason = mark.kwargs["reason"]
        assert str(tmp_path / "nowhere") in reason and "VLMFIX_REFERENCE" in reason and "../shared/reference" in reason
