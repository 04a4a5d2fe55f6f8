"""Writes deploy/grafana/evostream-dashboard.json (Grafana 10+ dashboard, Prometheus datasource).

Generated rather than hand-edited so that every panel's query names a metric the code exports
(tests/test_deploy_observability.py checks that). Run: python deploy/grafana/make_dashboard.py
"""

from __future__ import annotations

import json
from pathlib import Path

DS = {"type": "prometheus", "uid": "${datasource}"}
#: the query API's endpoints in a label matcher: every endpoint but the probes and the scrape
_API = 'endpoint!~"/metrics|/healthz|/readyz"'

# (title, unit, [(expr, legend)])
PANELS: list[tuple[str, str, list[tuple[str, str]]]] = [
    ("Turns applied / s", "ops", [("sum by (worker) (rate(evostream_turns_applied_total[1m]))", "{{worker}}")]),
    ("Consumer lag (records, per partition)", "short",
     [("sum by (partition) (evostream_consumer_lag)", "partition {{partition}}")]),
    ("Turn -> embedding latency", "s",
     [("histogram_quantile(0.5, sum by (le) (rate(evostream_turn_to_embedding_seconds_bucket[5m])))", "p50"),
      ("histogram_quantile(0.99, sum by (le) (rate(evostream_turn_to_embedding_seconds_bucket[5m])))", "p99")]),
    # The query API (issue #18: the only API panel showed the deprecated /v1/query). Probes and
    # scrapes (/healthz, /readyz, /metrics) are left out of the request panels.
    ("API requests / s by endpoint", "reqps",
     [(f"sum by (endpoint) (rate(evostream_api_requests_total{{{_API}}}[1m]))", "{{endpoint}}")]),
    ("API errors / s by status (4xx, 5xx)", "reqps",
     [(f"sum by (status) (rate(evostream_api_requests_total{{{_API}, status=~\"[45]..\"}}[1m]))", "{{status}}")]),
    ("API overloaded: 429 / s (query queue full)", "reqps",
     [("sum by (worker) (rate(evostream_query_rejected_total[1m]))", "{{worker}}")]),
    ("Query queue depth (requests waiting for the model)", "short",
     [("max by (worker) (evostream_query_queue_depth)", "{{worker}}")]),
    ("API latency by endpoint (p50, p99)", "s",
     [(f"histogram_quantile(0.5, sum by (le, endpoint) (rate(evostream_api_request_seconds_bucket{{{_API}}}[5m])))",
       "p50 {{endpoint}}"),
      (f"histogram_quantile(0.99, sum by (le, endpoint) (rate(evostream_api_request_seconds_bucket{{{_API}}}[5m])))",
       "p99 {{endpoint}}")]),
    ("Ingestion healthy (1 = consuming; readiness does not depend on it)", "short",
     [("min by (worker) (evostream_ingestion_healthy)", "{{worker}}")]),
    ("Batch stages (p50)", "s",
     [(f"histogram_quantile(0.5, sum by (le) (rate(evostream_{m}_seconds_bucket[5m])))", m)
      for m in ("step", "state_load", "checkpoint", "emit", "batch")]),
    ("Batch size (turns, p50)", "short",
     [("histogram_quantile(0.5, sum by (le) (rate(evostream_batch_turns_bucket[5m])))", "p50")]),
    ("Dead letters / s by reason", "ops",
     [("sum by (reason) (rate(evostream_dead_letters_total[5m]))", "{{reason}}")]),
    ("Duplicates, re-emits, gaps / s", "ops",
     [("sum(rate(evostream_turns_duplicate_total[5m]))", "duplicates"),
      ("sum(rate(evostream_embeddings_reemitted_total[5m]))", "re-emitted"),
      ("sum(rate(evostream_seq_gaps_total[5m]))", "seq gaps")]),
    ("Paused / broker connected", "short",
     [("max by (worker) (evostream_paused)", "paused {{worker}}"),
      ("min by (worker) (evostream_broker_connected)", "broker connected {{worker}}")]),
    ("Checkpoint conflicts and Redis outages / s", "ops",
     [("sum(rate(evostream_checkpoint_conflicts_total[5m]))", "CAS conflicts"),
      ("sum(rate(evostream_store_unavailable_total[5m]))", "Redis unavailable")]),
    ("State cache", "bytes",
     [("sum by (worker) (evostream_state_cache_bytes)", "{{worker}}")]),
    ("State cache hit ratio", "percentunit",
     [("sum(rate(evostream_state_cache_hits_total[5m])) / clamp_min(sum(rate(evostream_state_cache_hits_total[5m])) "
       "+ sum(rate(evostream_state_cache_misses_total[5m])), 1e-9)", "hit ratio")]),
    ("Worker memory (RSS)", "bytes", [("process_resident_memory_bytes{job=\"evostream-workers\"}", "{{worker}}")]),
    ("Worker CPU", "percentunit",
     [("rate(process_cpu_seconds_total{job=\"evostream-workers\"}[1m])", "{{worker}}")]),
]


def dashboard() -> dict:
    panels = []
    for i, (title, unit, targets) in enumerate(PANELS):
        panels.append({
            "id": i + 1, "type": "timeseries", "title": title, "datasource": DS,
            "gridPos": {"h": 8, "w": 12, "x": 12 * (i % 2), "y": 8 * (i // 2)},
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "options": {"legend": {"displayMode": "list", "placement": "bottom"}, "tooltip": {"mode": "multi"}},
            "targets": [{"refId": chr(65 + j), "datasource": DS, "expr": expr, "legendFormat": legend}
                        for j, (expr, legend) in enumerate(targets)],
        })
    return {
        "title": "evostream", "uid": "evostream-overview", "schemaVersion": 39, "version": 1, "editable": True,
        "time": {"from": "now-1h", "to": "now"}, "refresh": "10s", "tags": ["evostream"],
        "templating": {"list": [{"name": "datasource", "type": "datasource", "query": "prometheus",
                                 "label": "Prometheus"}]},
        "panels": panels,
    }


if __name__ == "__main__":
    out = Path(__file__).with_name("evostream-dashboard.json")
    out.write_text(json.dumps(dashboard(), indent=2) + "\n")
    print(f"wrote {out} ({len(PANELS)} panels)")
