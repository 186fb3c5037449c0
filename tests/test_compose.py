"""docker-compose.yml, checked as far as a machine without a Docker engine can: its structure, and that every
command it runs exists in the image it builds (the package's CLI, Ray's, optuna-dashboard, pg_isready)."""
import re
import shlex
from pathlib import Path

import pytest
import tomllib
import yaml

from evomerge.cli import app
from evomerge.studyfile import load_study

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]


def argv(service: str) -> list[str]:
    """The service's command as the container runs it, with ${VAR:-default} at its default."""
    cmd = SERVICES[service]["command"]
    if cmd[:2] == ["sh", "-c"]:
        cmd = shlex.split(re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", cmd[2]))
        cmd = cmd[1:] if cmd[0] == "exec" else cmd
    return cmd


def test_the_stack_has_the_database_ray_head_gpu_workers_controller_and_dashboard():
    assert set(SERVICES) == {"postgres", "ray-head", "ray-worker", "controller", "dashboard"}


def test_postgres_is_healthy_only_when_it_accepts_tcp_connections_for_its_user_and_database():
    pg = SERVICES["postgres"]
    check = pg["healthcheck"]["test"]
    assert check[:2] == ["CMD", "pg_isready"]
    assert check[check.index("-h") + 1] == "127.0.0.1"
    assert check[check.index("-U") + 1] == pg["environment"]["POSTGRES_USER"]
    assert check[check.index("-d") + 1] == pg["environment"]["POSTGRES_DB"]
    for name in ("controller", "dashboard"):
        assert SERVICES[name]["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_ray_containers_size_shared_memory_and_workers_reserve_nvidia_gpus():
    for name in ("ray-head", "ray-worker", "controller"):
        assert SERVICES[name]["shm_size"] not in (None, "64m")
    devices = SERVICES["ray-worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert argv("ray-worker")[:3] == ["ray", "start", "--address=ray-head:6379"]
    assert "--head" in argv("ray-head") and "--port=6379" in argv("ray-head")


def test_the_controller_runs_an_existing_evomerge_command_on_a_shipped_ray_study():
    cmd = argv("controller")
    assert cmd[0] == "evomerge" and cmd[1] in {c.name or c.callback.__name__ for c in app.registered_commands}
    cfg = load_study(ROOT / cmd[2])
    assert cfg.executor.name == "ray"
    assert "--storage" in cmd and SERVICES["controller"]["environment"]["RAY_ADDRESS"] == "ray-head:6379"


@pytest.mark.parametrize("service", ["ray-head", "ray-worker", "controller", "dashboard"])
def test_every_program_the_image_runs_is_installed_by_its_dockerfile(service):
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = re.search(r'pip install .*"/app\[([^\]]*)\]"', (ROOT / "Dockerfile").read_text()).group(1).split(",")
    provided = {"evomerge": project["scripts"]}
    provided["ray"] = [d for e in extras for d in project["optional-dependencies"][e] if d.startswith("ray")]
    provided["optuna-dashboard"] = [d for e in extras for d in project["optional-dependencies"][e]
                                    if d.startswith("optuna-dashboard")]
    assert provided[argv(service)[0]], f"{service} runs {argv(service)[0]}, which the image does not install"
