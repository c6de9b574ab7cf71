"""Static checks of the docker stack: the compose file, the image, Orthanc's forwarding.

No Docker engine runs here. ``docker compose config`` (or Debian's ``docker-compose
config``) validates the file against the Compose schema when a CLI is installed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from boneflow.config import _PARSERS
from boneflow.orthanc import FORWARDED_SOP_CLASSES, forward_script

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
CONTRACT_KEYS = {f"BONEFLOW_{name.upper()}" for name in _PARSERS}
PASSWORDS = {"POSTGRES_PASSWORD": "pg-test-secret", "ORTHANC_PASSWORD": "orthanc-test-secret"}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    """The compose file with its ``${VAR:-default}`` defaults filled in, as compose would."""
    loaded = yaml.safe_load(_interpolate((DOCKER / "compose.yml").read_text()))
    assert isinstance(loaded, dict)
    return loaded


def _interpolate(text: str) -> str:
    def value(match: re.Match[str]) -> str:
        name, operator, word = match.group(1), match.group(2), match.group(3) or ""
        if operator == ":-":
            return word
        return PASSWORDS.get(name, f"<{name}>")

    text = re.sub(r"\$\{([A-Z_]+)(?:(:-|:\?)([^}]*))?\}", value, text.replace("$$", "__DOLLAR__"))
    return text.replace("__DOLLAR__", "$")


def _environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    assert isinstance(env, dict), "environment is written as a mapping"
    return {str(k): str(v) for k, v in env.items()}


def test_the_stack_has_every_service_the_deployment_needs(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) >= {
        "orthanc",
        "redis",
        "postgres",
        "migrate",
        "listener",
        "worker",
        "worker-gpu",
        "flower",
        "prometheus",
    }
    assert services["listener"]["command"] == ["listen"]
    assert services["worker"]["command"][0] == "worker"
    assert services["worker-gpu"]["command"][0] == "worker"
    assert services["migrate"]["command"] == ["db", "upgrade"]
    assert services["worker"]["profiles"] == ["cpu"]
    assert services["worker-gpu"]["profiles"] == ["gpu"]
    assert services["prometheus"]["profiles"] == ["monitoring"]
    for name in ("listener", "worker", "worker-gpu"):
        depends = services[name]["depends_on"]
        assert depends["migrate"]["condition"] == "service_completed_successfully"
        assert depends["redis"]["condition"] == "service_healthy"
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_boneflow_is_configured_only_through_contract_keys(compose: dict[str, Any]) -> None:
    seen: set[str] = set()
    for name, service in compose["services"].items():
        for key in _environment(service):
            if key.startswith("BONEFLOW_"):
                assert key in CONTRACT_KEYS, f"{name}: {key} is not a configuration key"
                seen.add(key)
    assert {
        "BONEFLOW_AE_TITLE",
        "BONEFLOW_ALLOWED_CALLERS",
        "BONEFLOW_DESTINATIONS",
        "BONEFLOW_DATABASE_URL",
        "BONEFLOW_BROKER_URL",
        "BONEFLOW_DATA_DIR",
        "BONEFLOW_MODEL_DIR",
        "BONEFLOW_DEVICE",
    } <= seen
    listener = _environment(compose["services"]["listener"])
    assert listener["BONEFLOW_DATABASE_URL"].startswith("postgresql+psycopg://")
    assert listener["BONEFLOW_DATABASE_URL"].endswith("@postgres:5432/boneflow")
    assert listener["BONEFLOW_BROKER_URL"] == "redis://redis:6379/0"
    assert listener["BONEFLOW_HOST"] == "0.0.0.0"
    assert _environment(compose["services"]["worker"])["BONEFLOW_DEVICE"] == "cpu"
    assert _environment(compose["services"]["worker-gpu"])["BONEFLOW_DEVICE"] == "cuda"
    example = (DOCKER / "env.example").read_text()
    for key in re.findall(r"^(BONEFLOW_[A-Z_]+)=", example, re.MULTILINE):
        assert key in CONTRACT_KEYS or key in {"BONEFLOW_DICOM_PORT", "BONEFLOW_WORKER_CONCURRENCY"}


def test_no_secret_is_written_in_the_stack(compose: dict[str, Any]) -> None:
    text = (DOCKER / "compose.yml").read_text()
    assert "${POSTGRES_PASSWORD:?" in text and "${ORTHANC_PASSWORD:?" in text
    assert re.search(r"^POSTGRES_PASSWORD=$", (DOCKER / "env.example").read_text(), re.M)
    assert "RegisteredUsers" not in (DOCKER / "orthanc" / "orthanc.json").read_text()


def test_volumes_hold_spool_models_and_database(compose: dict[str, Any]) -> None:
    assert set(compose["volumes"]) >= {"data", "models", "postgres", "redis", "orthanc"}
    services = compose["services"]
    assert "data:/data" in services["listener"]["volumes"]
    for name in ("worker", "worker-gpu"):
        assert {"data:/data", "models:/models"} <= set(services[name]["volumes"])
    assert "postgres:/var/lib/postgresql/data" in services["postgres"]["volumes"]


def test_gpu_worker_reserves_an_nvidia_device(compose: dict[str, Any]) -> None:
    devices = compose["services"]["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia"
    assert devices[0]["capabilities"] == ["gpu"]
    args = compose["services"]["worker-gpu"]["build"]["args"]
    assert "cu" in args["TORCH_INDEX_URL"].rsplit("/", 1)[-1]


def test_only_the_dicom_port_is_published_beyond_this_host(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            if name == "listener":
                assert port.endswith(":11112")
            else:
                assert port.startswith("127.0.0.1:"), f"{name} publishes {port} to the network"


def test_orthanc_forwards_cr_dx_to_the_listener_and_accepts_only_boneflow(
    compose: dict[str, Any],
) -> None:
    config = json.loads((DOCKER / "orthanc" / "orthanc.json").read_text())
    modality = config["DicomModalities"]["boneflow"]
    listener = _environment(compose["services"]["listener"])
    assert modality["Host"] == "listener"
    assert modality["Port"] == int(listener["BONEFLOW_PORT"])
    assert modality["AET"] == "BONEFLOW"
    assert "BONEFLOW" in listener["BONEFLOW_AE_TITLE"]
    assert config["DicomAlwaysAllowStore"] is False
    assert config["DicomCheckCalledAet"] is True
    assert config["AuthenticationEnabled"] is True
    assert "ORTHANC" in listener["BONEFLOW_ALLOWED_CALLERS"]
    assert listener["BONEFLOW_DESTINATIONS"].startswith(f"{config['DicomAet']}@orthanc:")
    mounts = compose["services"]["orthanc"]["volumes"]
    assert f"./orthanc/forward.lua:{config['LuaScripts'][0]}:ro" in mounts
    lua = (DOCKER / "orthanc" / "forward.lua").read_text()
    assert lua == forward_script("BONEFLOW"), "regenerate docker/orthanc/forward.lua"
    for uid in FORWARDED_SOP_CLASSES:
        assert f"['{uid}'] = true" in lua


def test_prometheus_scrapes_the_metrics_port(compose: dict[str, Any]) -> None:
    config = yaml.safe_load((DOCKER / "prometheus.yml").read_text())
    port = _environment(compose["services"]["listener"])["BONEFLOW_METRICS_PORT"]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["boneflow-listener"]["static_configs"][0]["targets"] == [f"listener:{port}"]
    assert jobs["boneflow-worker"]["dns_sd_configs"][0]["port"] == int(port)


def test_the_image_is_multi_stage_non_root_and_checks_health_by_c_echo() -> None:
    text = (DOCKER / "Dockerfile").read_text()
    assert len(re.findall(r"^FROM ", text, re.M)) >= 2
    assert "COPY --from=build" in text
    user = re.findall(r"^USER (\S+)", text, re.M)
    assert user and user[-1] not in {"root", "0"}
    health = re.search(r"^HEALTHCHECK .*?CMD (.+?)$", text, re.M | re.S)
    assert health and "boneflow echo" in health.group(1)
    for key in re.findall(r"\b(BONEFLOW_[A-Z_]+)=", text):
        assert key in CONTRACT_KEYS
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", "boneflow-data", "docker/.env"} <= set(ignored)


def _compose_cli() -> list[str] | None:
    docker = shutil.which("docker")
    if (
        docker
        and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0
    ):
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


@pytest.mark.skipif(_compose_cli() is None, reason="neither docker compose nor docker-compose")
def test_docker_compose_config_accepts_the_file_and_demands_the_passwords() -> None:
    cli = _compose_cli()
    assert cli is not None
    env = {k: v for k, v in os.environ.items() if k not in PASSWORDS} | {"COMPOSE_PROFILES": ""}
    base = [*cli, "--project-directory", str(DOCKER), "-f", str(DOCKER / "compose.yml")]
    done = subprocess.run([*base, "config"], env=env | PASSWORDS, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    resolved = yaml.safe_load(done.stdout)
    listener = resolved["services"]["listener"]["environment"]
    assert listener["BONEFLOW_DATABASE_URL"].split("@")[0].endswith(":pg-test-secret")
    missing = subprocess.run([*base, "config"], env=env, capture_output=True, text=True)
    assert missing.returncode != 0
    assert "PASSWORD" in missing.stderr
