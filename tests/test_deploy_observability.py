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
    from types import SimpleNamespace

    from stream.api.health import install_ingestion_gauge

    m = Metrics()
    api = ApiMetrics(m.registry)
    api.request_s.labels(endpoint="/v1/embeddings").observe(0.01)
    api.requests.labels(endpoint="/v1/embeddings", status="429").inc()
    install_ingestion_gauge(SimpleNamespace(metrics=m))
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


def test_dashboard_shows_the_query_api_not_the_deprecated_route() -> None:
    """Issue #18 item 7: the only API panel showed the deprecated /v1/query; request rate,
    errors, 429 and queue depth were exported but not shown."""
    board = json.loads((DEPLOY / "grafana" / "evostream-dashboard.json").read_text())
    exprs = [t["expr"] for p in board["panels"] for t in p["targets"]]
    assert not any("/v1/query" in e for e in exprs)
    assert any("evostream_api_requests_total" in e and "status=~" in e for e in exprs), "no error-rate panel"
    assert any("evostream_api_requests_total" in e and "by (endpoint)" in e for e in exprs), "no request-rate panel"
    assert any("evostream_query_rejected_total" in e for e in exprs), "no 429 panel"
    assert any("evostream_query_queue_depth" in e for e in exprs), "no queue-depth panel"
    assert any("evostream_ingestion_healthy" in e for e in exprs), "no ingestion panel"


def test_prometheus_config_scrapes_worker_metrics() -> None:
    cfg = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    job = jobs["evostream-workers"]
    assert job["metrics_path"] == "/metrics"
    names = [n for sd in job["dns_sd_configs"] for n in sd["names"]]
    assert names and all(re.fullmatch(r"[\w.-]+", n) for n in names)
    # the dashboard's process panels filter on this job name
    assert "evostream-workers" in (DEPLOY / "grafana" / "evostream-dashboard.json").read_text()
