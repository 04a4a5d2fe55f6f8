"""deploy/ observability files (issue #11): the Grafana dashboard is the generator's output and
queries only metrics the worker exports; the Prometheus config scrapes the workers' /metrics."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from stream.api.metrics import ApiMetrics
from stream.runtime.metrics import Metrics

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


def _exported_names() -> set[str]:
    m = Metrics()
    ApiMetrics(m.registry).request_s.labels(endpoint="/v1/query").observe(0.01)
    m.lag.labels(partition="0").set(0)  # labelled series appear once used
    m.dead_letters.labels(reason="invalid_json").inc(0)
    names: set[str] = set()
    for fam in text_string_to_metric_families(m.render().decode()):
        names.add(fam.name)
        names.update(s.name for s in fam.samples)
    return names


def test_dashboard_is_generated_and_queries_exported_metrics() -> None:
    spec = importlib.util.spec_from_file_location("make_dashboard", DEPLOY / "grafana" / "make_dashboard.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    on_disk = json.loads((DEPLOY / "grafana" / "evostream-dashboard.json").read_text())
    assert on_disk == mod.dashboard(), "dashboard JSON is stale: run python deploy/grafana/make_dashboard.py"
    exported = _exported_names()
    used = set()
    for panel in on_disk["panels"]:
        assert panel["targets"], panel["title"]
        for t in panel["targets"]:
            used.update(re.findall(r"\b((?:evostream|process|python)_[a-z_]+)", t["expr"]))
    missing = {n for n in used if n not in exported}
    assert not missing, f"dashboard queries metrics nobody exports: {sorted(missing)}"
    assert {"evostream_consumer_lag", "evostream_api_request_seconds_bucket", "process_resident_memory_bytes"} <= used


def test_prometheus_config_scrapes_worker_metrics() -> None:
    cfg = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    job = jobs["evostream-workers"]
    assert job["metrics_path"] == "/metrics"
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    assert targets and all(re.fullmatch(r"[\w.-]+:\d+", t) for t in targets)
    # the dashboard's process panels filter on this job name
    assert "evostream-workers" in (DEPLOY / "grafana" / "evostream-dashboard.json").read_text()
