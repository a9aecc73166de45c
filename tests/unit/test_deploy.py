"""The production install in ``deploy/``: compose file, images, systemd units, hospital config.

Nothing here builds an image or starts a container (the test machines have no registry
access). What can be checked without them is checked for real: ``docker compose config``
resolves the compose file, ``systemd-analyze verify`` loads the units, ``load_settings``
and ``radnode config check`` read the hospital configuration, and the routing rules are
run on synthetic CT and MR headers.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from pydicom.dataset import Dataset

from service.cli import main
from service.config import Settings, load_settings
from service.routing import SeriesFacts, route
from tests.conftest import REPO_ROOT, missing

DEPLOY = REPO_ROOT / "deploy"
COMPOSE_FILE = DEPLOY / "compose.yaml"
HOSPITAL = DEPLOY / "hospital.yaml"
UNITS = DEPLOY / "systemd"
DATA_DIR = "/var/lib/radnode"
CONFIG_PATH = "/etc/radnode/radnode.yaml"
VENV_RADNODE = "/opt/radnode/.venv/bin/radnode"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No RADNODE_* variable of the caller's shell may leak into these tests."""
    for name in list(os.environ):
        if name.upper().startswith("RADNODE_"):
            monkeypatch.delenv(name)


# -- docker compose ----------------------------------------------------------------------

def _compose_command() -> list[str]:
    """``docker compose`` (the CLI plugin), or the standalone v2 binary; else missing()."""
    candidates: list[list[str]] = []
    docker = shutil.which("docker")
    if docker:
        candidates.append([docker, "compose"])
    standalone = shutil.which("docker-compose")
    if standalone:
        candidates.append([standalone])
    for folder in ("/usr/libexec/docker/cli-plugins", "/usr/local/lib/docker/cli-plugins",
                   "/usr/lib/docker/cli-plugins", str(Path.home() / ".docker/cli-plugins")):
        plugin = Path(folder) / "docker-compose"
        if plugin.is_file() and os.access(plugin, os.X_OK):
            candidates.append([str(plugin)])
    for command in candidates:
        try:
            version = subprocess.run([*command, "version"], capture_output=True, text=True,
                                     timeout=30, check=False)
        except (OSError, subprocess.TimeoutExpired):
            continue
        # v1 (docker-compose 1.x, Python) cannot read this file: Compose v2 only.
        if version.returncode == 0 and re.search(r"version v?2\.", version.stdout):
            return command
    missing("Docker Compose v2 not found (docker compose, docker-compose)")
    raise AssertionError("unreachable")


def _compose_config(*args: str, env_file: Path = Path(os.devnull)) -> dict[str, Any]:
    """``docker compose -f deploy/compose.yaml --env-file F [ARGS] config --format json``.

    By default with an empty env file: the compose file's own defaults, whatever a local
    ``deploy/.env`` says.
    """
    command = [*_compose_command(), "-f", str(COMPOSE_FILE), "--env-file", str(env_file)]
    env = {k: v for k, v in os.environ.items()  # the file's own defaults, not the shell's
           if not re.match(r"(POSTGRES|REDIS|GRAFANA|RADNODE)_", k)}
    result = subprocess.run([*command, *args, "config", "--format", "json"],
                            capture_output=True, text=True, timeout=60, check=False, env=env)
    assert result.returncode == 0, f"docker compose config failed:\n{result.stderr}"
    config: dict[str, Any] = json.loads(result.stdout)
    return config


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    """The resolved compose file, every profile on."""
    return _compose_config("--profile", "cpu", "--profile", "monitoring")


def _volume_targets(service: dict[str, Any], kind: str) -> dict[str, str]:
    return {v["target"]: v["source"] for v in service.get("volumes", []) if v["type"] == kind}


def test_compose_config_passes_without_profiles_or_env_file() -> None:
    config = _compose_config()
    assert set(config["services"]) == {"postgres", "redis", "migrate", "node", "worker"}


def test_compose_services_and_profiles(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"postgres", "redis", "migrate", "node", "worker", "worker-cpu",
                             "prometheus", "grafana"}
    assert services["worker-cpu"]["profiles"] == ["cpu"]
    assert services["prometheus"]["profiles"] == ["monitoring"]
    assert services["grafana"]["profiles"] == ["monitoring"]
    for name in ("postgres", "redis", "migrate", "node", "worker"):
        assert "profiles" not in services[name], name
    for name, service in services.items():  # pinned images: a version, no floating tag
        image = service["image"]
        assert re.fullmatch(r"[\w./-]+:v?\d+\.\d+[\w.-]*", image), (name, image)


def test_compose_gpu_worker(compose: dict[str, Any]) -> None:
    worker = compose["services"]["worker"]
    command = worker["command"]
    assert command[0] == "worker"
    assert command[command.index("--queues") + 1] == "gpu"
    assert command[command.index("--gpus") + 1] == "0"  # the one GPU the container sees
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "device_ids": ["0"], "capabilities": ["gpu"]}]
    cpu = compose["services"]["worker-cpu"]["command"]
    assert cpu[cpu.index("--queues") + 1] == "cpu" and "--gpus" not in cpu
    assert "deploy" not in compose["services"]["worker-cpu"]


def test_compose_order_of_start(compose: dict[str, Any]) -> None:
    services = compose["services"]
    migrate = services["migrate"]
    assert migrate["command"][:2] == ["db", "upgrade"]
    assert migrate["restart"] == "no"
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("node", "worker", "worker-cpu"):
        depends = services[name]["depends_on"]
        assert depends["migrate"]["condition"] == "service_completed_successfully", name
        assert depends["postgres"]["condition"] == "service_healthy", name
        assert depends["redis"]["condition"] == "service_healthy", name
    for name in ("worker", "worker-cpu"):  # the node writes the data directory's marker
        assert services[name]["depends_on"]["node"]["condition"] == "service_healthy"


def test_compose_health_checks(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])
    assert services["redis"]["healthcheck"]["test"][-2:] == ["redis-cli", "ping"]
    node_check = " ".join(services["node"]["healthcheck"]["test"])
    assert "http://127.0.0.1:8104/healthz" in node_check
    assert node_check.startswith("CMD python -c")


def test_compose_shared_data_dir_and_config(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name in ("node", "worker", "worker-cpu"):
        service = services[name]
        assert _volume_targets(service, "volume")[DATA_DIR] == "radnode-data", name
        config_mount = _volume_targets(service, "bind")
        assert Path(config_mount[CONFIG_PATH]) == HOSPITAL, name
        assert service["environment"]["RADNODE_DATA_DIR"] == DATA_DIR
        assert service["environment"]["RADNODE_DATABASE__URL"].startswith(
            "postgresql://radnode:")
        assert service["environment"]["RADNODE_BROKER__URL"].startswith("redis://")
    assert "radnode-data" in compose["volumes"]
    assert _volume_targets(services["postgres"], "volume")["/var/lib/postgresql/data"] \
        == "postgres-data"
    node = services["node"]
    assert node["environment"]["RADNODE_BROKER__EMBEDDED_WORKER"] == "false"  # no torch
    ports = {(p["target"], p.get("host_ip", "")) for p in node["ports"]}
    assert (11112, "") in ports and (8104, "127.0.0.1") in ports  # HTTP on loopback only
    for name in ("postgres", "redis"):  # default passwords never leave the compose network
        assert "ports" not in services[name], name
    for name in ("migrate", "node", "worker", "worker-cpu"):  # build from the repo root
        build = services[name]["build"]
        assert Path(build["context"]) == REPO_ROOT
        assert (REPO_ROOT / build["dockerfile"]).is_file()


def test_compose_secrets_come_from_the_env_file(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("POSTGRES_PASSWORD=pg-Secret-1\nREDIS_PASSWORD=redis-Secret-2\n"
                        "RADNODE_GPU=3\n", encoding="utf-8")
    services = _compose_config(env_file=env_file)["services"]
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD"] == "pg-Secret-1"
    for name in ("migrate", "node", "worker"):
        environment = services[name]["environment"]
        assert environment["RADNODE_DATABASE__URL"] == \
            "postgresql://radnode:pg-Secret-1@postgres:5432/radnode"
        assert environment["RADNODE_BROKER__URL"] == "redis://:redis-Secret-2@redis:6379/0"
    assert "redis-Secret-2" in services["redis"]["command"]
    reservation = services["worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert reservation["device_ids"] == ["3"]
    # The example env file resolves as well.
    _compose_config(env_file=DEPLOY / ".env.example")


def test_compose_second_gpu_worker_sees_one_gpu(tmp_path: Path) -> None:
    """The README's override for a second GPU: one GPU per worker, not two (list merging)."""
    override = tmp_path / "compose.override.yaml"
    override.write_text(
        "services:\n"
        "  worker-gpu1:\n"
        f"    extends: {{file: {COMPOSE_FILE}, service: worker}}\n"
        "    deploy:\n"
        "      resources:\n"
        "        reservations:\n"
        "          devices: !override\n"
        "            - {driver: nvidia, device_ids: [\"1\"], capabilities: [gpu]}\n",
        encoding="utf-8")
    assert "devices: !override" in (DEPLOY / "README.md").read_text(encoding="utf-8")
    services = _compose_config("-f", str(override))["services"]
    for name, gpu in (("worker", "0"), ("worker-gpu1", "1")):
        devices = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert [d["device_ids"] for d in devices] == [[gpu]], name
        assert services[name]["command"][-2:] == ["--gpus", "0"]
        assert _volume_targets(services[name], "volume")[DATA_DIR] == "radnode-data"


def test_compose_monitoring_files(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name in ("prometheus", "grafana"):
        for source in _volume_targets(services[name], "bind").values():
            assert Path(source).exists(), (name, source)
    prometheus = (DEPLOY / "prometheus" / "prometheus.yml").read_text(encoding="utf-8")
    assert "node:8104" in prometheus
    assert "credentials_file: /run/secrets/radnode-metrics-token" in prometheus
    assert services["prometheus"]["secrets"][0]["source"] == "radnode-metrics-token"
    grafana = _volume_targets(services["grafana"], "bind")
    dashboards = (DEPLOY / "grafana/provisioning/dashboards/radnode.yaml").read_text("utf-8")
    dashboard_folder = re.search(r"path:\s*(\S+)", dashboards)
    assert dashboard_folder is not None
    assert Path(grafana[f"{dashboard_folder[1]}/radnode.json"]) == DEPLOY / "grafana/radnode.json"
    dashboard = json.loads((DEPLOY / "grafana/radnode.json").read_text(encoding="utf-8"))
    # A provisioned dashboard gets no __inputs: ${DS_PROMETHEUS} must be a variable.
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"


# -- the hospital configuration ---------------------------------------------------------

@pytest.fixture(scope="module")
def hospital() -> Iterator[Settings]:
    saved = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("RADNODE_")}
    try:
        yield load_settings(HOSPITAL)
    finally:
        os.environ.update(saved)


def test_hospital_config_loads(hospital: Settings) -> None:
    assert str(hospital.data_dir) == DATA_DIR
    assert hospital.database.auto_upgrade is False
    assert hospital.database.url.startswith("postgresql://")
    assert hospital.broker.url.startswith("redis://")
    assert hospital.broker.embedded_worker is False
    pacs = hospital.destination("pacs")
    assert pacs.kind == "dicom" and pacs.storage_commitment is True and not pacs.deidentify
    research = hospital.destination("research")
    assert research.deidentify not in (False, None)
    assert [d.name for d in hospital.destinations if d.deidentify] == ["research"]
    policy = {a.ae_title: a for a in hospital.dicom.aes}[hospital.dicom.ae_title]
    assert {"CT1", "MR1", "PACS"} <= set(policy.calling_ae_titles)
    networks = [ipaddress.ip_network(a) for a in policy.peer_addresses]
    for host in (pacs.host, "10.10.20.11", "10.10.20.21"):  # PACS: Storage Commitment reports
        assert any(ipaddress.ip_address(host) in n for n in networks), host
    assert hospital.dicom.tls is None  # no TLS file that does not exist


def test_hospital_config_takes_urls_from_the_environment(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RADNODE_DATABASE__URL", "postgresql://radnode:pw@postgres:5432/radnode")
    monkeypatch.setenv("RADNODE_BROKER__URL", "redis://:pw@redis:6379/0")
    settings = load_settings(HOSPITAL)
    assert settings.database.url == "postgresql://radnode:pw@postgres:5432/radnode"
    assert settings.broker.url == "redis://:pw@redis:6379/0"
    assert settings.database.auto_upgrade is False  # the file's other keys stay


def test_hospital_config_check_passes() -> None:
    result = CliRunner().invoke(main, ["config", "check", "--config", str(HOSPITAL)])
    assert result.exit_code == 0, result.output
    assert "configuration is valid" in result.output


def _header(modality: str, image_type: tuple[str, ...] = ("ORIGINAL", "PRIMARY", "AXIAL")
            ) -> Dataset:
    header = Dataset()
    header.Modality = modality
    header.ImageType = list(image_type)
    return header


@pytest.mark.parametrize(("modality", "calling_ae", "image_type", "expected"), [
    ("CT", "CT1", ("ORIGINAL", "PRIMARY", "AXIAL"),
     {"radnode-builtin-ct": {"pacs", "research"}}),
    ("CT", "PACS", ("ORIGINAL", "PRIMARY", "AXIAL"), {"radnode-builtin-ct": {"pacs"}}),
    ("MR", "MR1", ("ORIGINAL", "PRIMARY", "M"), {"radnode-builtin-mr": {"pacs"}}),
    ("CT", "CT1", ("ORIGINAL", "PRIMARY", "LOCALIZER"), {}),
    ("US", "CT1", ("ORIGINAL", "PRIMARY"), {}),
])
def test_hospital_rules(hospital: Settings, modality: str, calling_ae: str,
                        image_type: tuple[str, ...], expected: dict[str, set[str]]) -> None:
    facts = SeriesFacts(header=_header(modality, image_type), calling_ae=calling_ae,
                        called_ae="RADNODE", peer_address="10.10.20.11")
    routing = route(hospital.rules, hospital.fallback, facts)
    assert {t.model: set(t.destinations) for t in routing.targets} == expected


# -- Dockerfiles -------------------------------------------------------------------------

def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines = dockerfile.read_text(encoding="utf-8").splitlines()
    out: list[tuple[str, str]] = []
    current = ""
    for line in lines:
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if current and line.lstrip().startswith("#"):
            continue
        current += line.rstrip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        keyword, _, arguments = current.strip().partition(" ")
        out.append((keyword.upper(), arguments.strip()))
        current = ""
    return out


def _stages(instructions: list[tuple[str, str]]) -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for keyword, arguments in instructions:
        if keyword == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((keyword, arguments))
    return stages


#: ``name:TAG`` where TAG holds an exact version (major.minor.patch), optionally ``@sha256:``.
PINNED = re.compile(
    r"^[\w./-]+:(?P<tag>[\w.-]*?\d+\.\d+\.\d+[\w.-]*)(@sha256:[0-9a-f]{64})?$")


@pytest.mark.parametrize("name", ["Dockerfile.node", "Dockerfile.worker"])
def test_dockerfile_pinned_non_root_no_secrets(name: str) -> None:
    instructions = _instructions(DEPLOY / name)
    stage_names: set[str] = set()
    for keyword, arguments in instructions:
        if keyword != "FROM":
            continue
        words = [w for w in arguments.split() if not w.startswith("--platform")]
        image = words[0]
        if image.lower() in stage_names:
            continue
        match = PINNED.match(image)
        assert match, f"{name}: base image {image} is not pinned to an exact version tag"
        assert "latest" not in match["tag"]
        if len(words) == 3 and words[1].upper() == "AS":
            stage_names.add(words[2].lower())
    final = _stages(instructions)[-1]
    users = [arguments for keyword, arguments in final if keyword == "USER"]
    assert users, f"{name}: the final stage sets no USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0") and int(user) >= 1000
    for keyword, arguments in instructions:
        if keyword in ("ENV", "ARG", "LABEL"):
            assert not re.search(r"PASSWORD|SECRET|TOKEN|postgresql://", arguments, re.I), \
                (name, arguments)
        if keyword in ("COPY", "ADD") and "--from=" not in arguments:
            for source in arguments.split()[:-1]:
                assert (REPO_ROOT / source).exists(), (name, source)  # context = repo root
    for keyword, arguments in instructions:  # exec form: invalid JSON would become shell form
        exec_form = arguments.partition("CMD ")[2] if keyword == "HEALTHCHECK" else arguments
        if keyword in ("CMD", "ENTRYPOINT", "HEALTHCHECK") and exec_form.startswith("["):
            assert isinstance(json.loads(exec_form), list), (name, keyword)
    entrypoint = [a for k, a in final if k == "ENTRYPOINT"]
    assert entrypoint and json.loads(entrypoint[-1]) == ["radnode"]


def test_node_image_has_no_torch() -> None:
    instructions = _instructions(DEPLOY / "Dockerfile.node")
    installs = [a for k, a in instructions if k == "RUN" and "pip install" in a]
    assert installs
    for command in installs:
        for part in re.split(r"&&|;", command):
            if "pip install" in part:
                assert "torch" not in part and "[worker]" not in part, part
    # The project's base dependencies, which the node installs, hold no torch or MONAI.
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    base = " ".join(project["project"]["dependencies"]).lower()
    assert "torch" not in base and "monai" not in base
    assert "psycopg[binary]" in base
    keywords = {k: a for k, a in instructions}
    assert set(keywords["EXPOSE"].split()) == {"11112", "8104"}
    assert "/healthz" in keywords["HEALTHCHECK"]


def test_worker_image_installs_cuda_torch_then_the_worker_extra() -> None:
    instructions = _instructions(DEPLOY / "Dockerfile.worker")
    runs = [a for k, a in instructions if k == "RUN"]
    torch_step = next(i for i, a in enumerate(runs) if "torch==" in a)
    extra_step = next(i for i, a in enumerate(runs) if '".[worker]"' in a)
    assert torch_step < extra_step
    args = {a.split("=")[0]: a.split("=", 1)[1] for k, a in instructions
            if k == "ARG" and "=" in a}
    assert re.fullmatch(r"https://download\.pytorch\.org/whl/cu\d+", args["TORCH_INDEX_URL"])
    assert any(a.startswith("nvidia/cuda:") for k, a in instructions if k == "FROM")


def test_dockerignore_sends_only_the_sources() -> None:
    patterns = [line.strip() for line in
                (REPO_ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
                if line.strip() and not line.startswith("#")]

    def ignored(path: str) -> bool:
        verdict = False
        parts = path.split("/")
        prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        for pattern in patterns:
            negate = pattern.startswith("!")
            glob = pattern.lstrip("!").rstrip("/")
            regex = re.escape(glob).replace(r"\*\*/", "(.*/)?").replace(r"\*", "[^/]*")
            if any(re.fullmatch(regex, prefix) for prefix in prefixes):
                verdict = not negate
        return verdict

    for name in ("Dockerfile.node", "Dockerfile.worker"):
        for keyword, arguments in _instructions(DEPLOY / name):
            if keyword == "COPY" and "--from=" not in arguments:
                for source in arguments.split()[:-1]:
                    assert not ignored(source.rstrip("/")), source
    assert not ignored("service/api/templates/index.html")
    for path in (".venv", ".git", "deploy/.env", "radnode-data", "radnode-demo",
                 "tests", "service/__pycache__", "deploy/prometheus/metrics-token"):
        assert ignored(path), path


# -- systemd units -----------------------------------------------------------------------

def _unit(path: Path) -> dict[str, list[tuple[str, str]]]:
    """Sections of a unit file: [(key, value)] in order (keys may repeat)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = line[1:-1]
            sections.setdefault(current, [])
            continue
        key, _, value = line.partition("=")
        sections[current].append((key.strip(), value.strip()))
    return sections


def _values(unit: dict[str, list[tuple[str, str]]], section: str, key: str) -> list[str]:
    return [v for k, v in unit.get(section, []) if k == key]


def _seconds(timespan: str) -> float:
    units = {"ms": 0.001, "s": 1, "sec": 1, "min": 60, "m": 60, "h": 3600, "": 1}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", timespan):
        total += float(number) * units[unit]
    return total


UNIT_NAMES = ["radnode-migrate.service", "radnode.service", "radnode-worker@.service"]


def test_units_run_radnode_hardened() -> None:
    for name in UNIT_NAMES:
        unit = _unit(UNITS / name)
        service = dict(unit["Service"])
        assert service["User"] == "radnode" and service["Group"] == "radnode", name
        assert service["EnvironmentFile"] == "/etc/radnode/radnode.env", name
        assert service["ExecStart"].startswith(f"{VENV_RADNODE} "), name
        assert f"--config {CONFIG_PATH}" in service["ExecStart"], name
        assert service["NoNewPrivileges"] == "yes", name
        assert service["ProtectSystem"] == "strict", name
        assert DATA_DIR in service["ReadWritePaths"].split(), name
        assert service["PrivateTmp"] == "yes" and service["ProtectHome"] == "yes", name
        # `radnode worker --gpus` pins the GPU itself; the units do not set it too.
        assert not any("CUDA_VISIBLE_DEVICES" in v for v in _values(unit, "Service", "Environment"))


def test_units_order_and_restart(hospital: Settings) -> None:
    migrate = dict(_unit(UNITS / "radnode-migrate.service")["Service"])
    assert migrate["Type"] == "oneshot"
    assert migrate["ExecStart"].split()[1:3] == ["db", "upgrade"]

    node = _unit(UNITS / "radnode.service")
    service = dict(node["Service"])
    assert service["ExecStart"].split()[1] == "serve"
    assert "radnode-migrate.service" in " ".join(_values(node, "Unit", "Wants")).split()
    assert "radnode-migrate.service" in " ".join(_values(node, "Unit", "After")).split()
    assert service["Restart"] == "on-failure"
    # SIGTERM drains for dicom.drain_timeout_s; systemd must not kill the node before.
    assert _seconds(service["TimeoutStopSec"]) > hospital.dicom.drain_timeout_s + 10

    worker = _unit(UNITS / "radnode-worker@.service")
    command = dict(worker["Service"])["ExecStart"].split()
    assert command[1] == "worker"
    assert command[command.index("--queues") + 1] == "gpu"
    assert command[command.index("--gpus") + 1] == "%i"
    assert dict(worker["Service"])["Restart"] == "on-failure"
    assert dict(worker["Service"]).get("PrivateDevices", "no") == "no"  # /dev/nvidia*
    assert DATA_DIR in " ".join(_values(worker, "Unit", "RequiresMountsFor")).split()
    # Migrations run once, from the node machine, never from every worker.
    assert "radnode-migrate.service" not in " ".join(_values(worker, "Unit", "Wants"))


def _systemd_root(tmp_path: Path, units: dict[str, str]) -> Path:
    """A root for ``systemd-analyze --root``: the system's units, ours, stub executables."""
    system_units = next((d for d in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system"))
                         if (d / "sysinit.target").is_file()), None)
    if system_units is None:
        missing("systemd's own units (sysinit.target) not found")
        raise AssertionError("unreachable")
    root = tmp_path / "root"
    shutil.copytree(system_units, root / "usr/lib/systemd/system", symlinks=True)
    target = root / "etc/systemd/system"
    target.mkdir(parents=True)
    for name, text in units.items():
        (target / name).write_text(text, encoding="utf-8")
        for line in text.splitlines():  # the programs the units start, as empty scripts
            key, _, value = line.partition("=")
            if key.strip().startswith("Exec") and value.strip():
                program = value.strip().lstrip("-+@!:").split()[0]
                stub = root / program.lstrip("/")
                stub.parent.mkdir(parents=True, exist_ok=True)
                stub.write_text("#!/bin/sh\n", encoding="utf-8")
                stub.chmod(0o755)
    return root


def _verify(root: Path) -> tuple[int, list[str]]:
    """``systemd-analyze --root verify`` of our units: exit status, lines about them."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        missing("systemd-analyze not found")
        raise AssertionError("unreachable")
    result = subprocess.run(
        [analyze, f"--root={root}", "--man=no", "verify", "radnode-migrate.service",
         "radnode.service", "radnode-worker@0.service"],
        capture_output=True, text=True, timeout=60, check=False, cwd=root)
    lines = [line for line in (result.stdout + result.stderr).splitlines()
             if "radnode" in line]
    return result.returncode, lines


def test_systemd_units_verify(tmp_path: Path) -> None:
    units = {name: (UNITS / name).read_text(encoding="utf-8") for name in UNIT_NAMES}
    returncode, complaints = _verify(_systemd_root(tmp_path / "good", units))
    assert returncode == 0 and not complaints, "\n".join(complaints)
    # The same check finds a broken unit (so a clean result above means something).
    units["radnode.service"] = units["radnode.service"].replace(
        "ProtectSystem=strict", "ProtectSystem=bogus\nRestartSecs=5")
    returncode, complaints = _verify(_systemd_root(tmp_path / "bad", units))
    assert any("bogus" in line for line in complaints), complaints
    assert any("RestartSecs" in line for line in complaints), complaints
