"""The wheel works from any directory: built here, installed into a fresh venv that sees the test
env's dependencies (not its editable trb), run from a temporary directory: the README's CPU tour,
verbatim."""

import json
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def test_wheel_installs_and_runs_from_any_directory(tmp_path):
    src = tmp_path / "src"  # a copy: building in the repo would leave build/ behind
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    for name in ("trb", "conf"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    dist = tmp_path / "dist"
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                        str(dist), str(src)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    (wheel,) = dist.glob("trb-*.whl")

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # the test env's packages as a plain path entry: its .pth files (the editable trb) are not run
    Path(site, "test_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    r = subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", str(wheel)], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]

    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    env.pop("TRB_CONF_DIR", None)
    env.pop("PYTHONPATH", None)  # only the venv's own trb
    where = subprocess.run([str(py), "-c", "import trb.cli; print(trb.cli.CONF_DIR)"], cwd=work, env=env,
                           capture_output=True, text=True, timeout=60)
    assert where.stdout.strip().startswith(site), where.stdout + where.stderr  # the wheel's trb, not the repo's
    shipped = sorted(str(p.relative_to(where.stdout.strip())) for p in Path(where.stdout.strip()).rglob("*.yaml"))
    assert shipped == sorted(str(p.relative_to(ROOT / "conf")) for p in (ROOT / "conf").rglob("*.yaml"))
    trb_exe = str(venv / "bin" / "trb")
    r = subprocess.run([trb_exe, "train", "--cfg", "job"], cwd=work, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "path: toy:student" in r.stdout, r.stderr[-3000:]
    r = subprocess.run([trb_exe, "train", "--help"], cwd=work, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "Traceback" not in r.stderr and "trb train" in r.stdout, r.stderr[-3000:]
    # the README's CPU tour, every line verbatim, from the installed wheel in an empty directory
    readme = (ROOT / "README.md").read_text()
    block = readme.split("<!-- tour -->", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    commands = [line for line in block.splitlines() if line.strip()]
    assert len(commands) >= 4 and all(c.startswith("trb ") for c in commands), commands
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env['PATH']}"
    for command in commands:
        r = subprocess.run(shlex.split(command), cwd=work, env=env, capture_output=True, text=True, timeout=900)
        assert r.returncode == 0 and "Traceback" not in r.stderr, (command, r.stderr[-3000:])
    runs = work / "runs"
    summary = json.loads((runs / "tour" / "summary.json").read_text())
    assert summary["accuracy_after"] > summary["accuracy_before"]  # the tour visibly distils
    assert (runs / "tour" / "checkpoints" / "step_000060" / "model.safetensors").exists()
    results = json.loads((runs / "tour-eval" / "results.json").read_text())
    assert results["results"][-1]["checkpoint"].endswith("step_000060")
    assert (runs / "tour-rollout" / "rollouts.html").exists() and (runs / "tour-report" / "report.md").exists()
    assert sorted(p.name for p in work.iterdir()) == ["runs"]  # nothing else written where it ran
