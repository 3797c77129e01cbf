"""A pod's start, reproduced without Docker: the image's layout (infra/Dockerfile) in a temp dir — a copy
of the code at another path, installed into a fresh venv with the Dockerfile's own install command — runs
the Dockerfile's own check (`python -m flows.deploy_steps --start`): every deployment of infra/prefect.yaml
runs its pull steps as stored, imports its flow from the copy and starts it through Prefect's engine up to
its first task, with nothing imported from this checkout.

The shortcut (a real image would `pip install -r infra/requirements.lock`, minutes of torch): the fresh
venv sees this venv's site-packages as a plain path entry (a `.pth` line), so the third-party packages are
reused but the `.pth` hooks in there — this checkout's editable install among them — never run; the code
itself is installed into the fresh venv from the copy, `--no-deps`, exactly as the Dockerfile does it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.integration

AFTER = """
import json, sys
from pathlib import Path
import flows.deploy_steps as d
code = d.main(["--start", "--json"])
checkout, packages = Path(sys.argv[1]), Path(sys.argv[2])  # this checkout; its venv's third-party packages
def ours(path):
    path = Path(path).resolve()
    return path.is_relative_to(checkout) and not path.is_relative_to(packages)
print(json.dumps({"exit": code, "from_checkout": [m.__file__ for m in list(sys.modules.values())
                                                  if getattr(m, "__file__", None) and ours(m.__file__)],
                  "sys_path": [p for p in sys.path if p and ours(p)]}))
"""


def _dockerfile_runs() -> list[str]:
    text = (ROOT / "infra" / "Dockerfile").read_text().replace("\\\n", " ")
    return [re.sub(r"\s+", " ", line[4:]).strip() for line in text.splitlines() if line.startswith("RUN ")]


def _copy_as_the_image_does(dest: Path) -> None:
    """COPY pyproject.toml README.md flows tasks prompts seed_annotations infra (the Dockerfile's list)."""
    copied = [
        w
        for line in (ROOT / "infra" / "Dockerfile").read_text().splitlines()
        if line.startswith("COPY ") and "requirements.lock" not in line
        for w in line.split()[1:-1]
    ]
    assert {"flows", "tasks", "infra", "pyproject.toml"} <= set(copied), copied
    dest.mkdir(parents=True)
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in copied:
        src = ROOT / name
        (shutil.copytree(src, dest / name, ignore=skip) if src.is_dir() else shutil.copy2(src, dest / name))


def test_every_deployment_starts_from_the_images_layout(tmp_path):
    home = tmp_path / "opt" / "editforge"
    _copy_as_the_image_does(home)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    site = Path(
        subprocess.run(
            [str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    (site / "_editforge_reused_packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    runs = _dockerfile_runs()
    install = next(r for r in runs if "--no-deps" in r)  # `pip install ... -e . && pip check`
    check = next(r for r in runs if "flows.deploy_steps" in r)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "EDITFORGE_HOME", "VIRTUAL_ENV")}
    env |= {
        "PATH": f"{venv / 'bin'}:{env['PATH']}",
        "EDITFORGE_HOME": str(home),  # the Dockerfile's ENV
        "PREFECT_HOME": str(tmp_path / "home" / ".prefect"),
        "EDITFORGE_CACHE": str(tmp_path / "home" / "cache"),
        "PREFECT_API_URL": "",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    env.pop("PREFECT_API_URL")
    (tmp_path / "home" / ".prefect").mkdir(parents=True)  # the image's user's home
    pip = (
        f"{BIN / 'pip'} --python {venv / 'bin' / 'python'}"  # this venv's pip, installing into the fresh one
    )
    t0 = time.monotonic()
    out = subprocess.run(
        install.replace("pip ", f"{pip} "),
        shell=True,
        cwd=home,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    print(f"install: {time.monotonic() - t0:.1f} s")

    assert check == "python -m flows.deploy_steps --start"
    out = subprocess.run(
        [str(venv / "bin" / "python"), "-c", AFTER, str(ROOT), str(Path(sys.prefix).resolve())],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows_line, summary_line = [line for line in out.stdout.splitlines() if line.startswith(("[", "{"))][-2:]
    rows, summary = json.loads(rows_line), json.loads(summary_line)
    assert summary == {"exit": 0, "from_checkout": [], "sys_path": []}, summary

    import yaml

    wanted = [d["name"] for d in yaml.safe_load((ROOT / "infra" / "prefect.yaml").read_text())["deployments"]]
    assert [r["deployment"] for r in rows] == wanted
    for row in rows:
        assert Path(row["code"]).is_relative_to(home) and row["directory"] == str(home), row
        assert row["pull_steps"] == [{"flows.deploy_steps.set_code_directory": {}}], row  # no path stored
        if row["deployment"] == "paper-evaluate":  # reads a trained model before its first task
            assert row["needs"].startswith("NoTrainedModelError"), row
        else:  # (filter and pack too: their partitions run in their block's task run, the first task)
            assert row["reached"], row
    reached = {r["deployment"]: r["reached"] for r in rows}
    assert (
        reached["demo-render"] == "task render-partitions"
        and reached["paper-train"] == "task train-partition"
    )
    assert reached["paper"].startswith("child run of editforge-captions/")  # the fan-out driver's first child
