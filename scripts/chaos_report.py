#!/usr/bin/env python3
"""Render the fault-injection results (tests/test_chaos.py) into RELIABILITY.md.

Every scenario of the chaos suite appends one JSON line to `EVOSTREAM_CHAOS_REPORT`
(default `.run/chaos-report.jsonl`) carrying its *ledger*: what the harness counted on the
topics and in Redis at the end (turns applied, dead-lettered by reason, expired, lost,
duplicates byte-identical and byte-different, checkpoints compared) and, kept apart, the
workers' own Prometheus counters. This script picks, per scenario, the newest line of the
chosen scale (default: `long` if the file has any long run, else `short`), writes those
ledgers to `benchmarks/results/chaos_<scale>.json`, and renders RELIABILITY.md with every
number as a figure marker into that file (benchmarks/figures.py; tests/test_figures.py fails
on a number that differs from it). Nothing is typed in.

    python scripts/chaos_report.py [--input FILE] [--output RELIABILITY.md] [--scale auto|short|long]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from chaos_report_text import FINDINGS, LIMITS, ORDER, TITLES, WHAT  # noqa: E402

SLOW_SCENARIOS = ("broker_pause", "broker_partition", "store_old_snapshot")  # marked slow in tests/test_chaos.py


def load(path: Path) -> list[dict]:
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            print(f"warning: {path}:{n}: skipped unparseable line ({exc})", file=sys.stderr)
    return rows


def pick(rows: list[dict], scale: str) -> tuple[str, dict[str, dict]]:
    """The newest complete run (all scenarios) of the scale, else the newest run; one line per
    scenario (the last one if a run repeated a scenario)."""
    if scale == "auto":
        scale = "long" if any(r.get("scale") == "long" for r in rows) else "short"
    runs: dict[str, dict[str, dict]] = {}
    newest: dict[str, str] = {}
    for r in rows:
        if r.get("scale") != scale:
            continue
        rid = r.get("run_id") or r.get("started_at", "?")
        runs.setdefault(rid, {})[r.get("scenario", "?")] = r
        newest[rid] = max(newest.get(rid, ""), r.get("started_at", ""))
    if not runs:
        return scale, {}
    order = sorted(runs, key=lambda rid: newest[rid], reverse=True)
    # the short run (`make test`) leaves out the scenarios marked slow
    expected = ORDER if scale == "long" else [n for n in ORDER if n not in SLOW_SCENARIOS]
    complete = [rid for rid in order if all(n in runs[rid] for n in expected)]
    base_id = (complete or order)[0]
    picked = dict(runs[base_id])
    # A scenario rerun alone after the complete run (e.g. after a harness fix) replaces that
    # scenario's line; the replacement is marked (`rerun_of`) and shown as such.
    started = min(r.get("started_at", "") for r in picked.values())
    for rid in order:
        if rid == base_id or newest[rid] < started:
            continue
        for name, r in runs[rid].items():
            if r.get("started_at", "") > picked.get(name, {}).get("started_at", ""):
                picked[name] = {**r, "rerun_of": base_id}
    return scale, picked


# ----------------------------------------------------------------------------- the results file

LEDGER = [  # (field, label) of every scenario's ledger, in table order
    ("turns", "turns streamed"),
    ("applied", "turns applied: embedding delivered, equal to the offline replay"),
    ("turns_in_checked_checkpoints", "... of which in checkpoints compared equal to the replay"),
    ("dead_lettered_total", "records dead-lettered (with a reason)"),
    ("expired", "conversations whose state was seen to expire"),
    ("lost", "turns lost (neither embedded nor dead-lettered)"),
    ("differing", "turns embedded differently from the replay"),
    ("checkpoints_compared", "checkpoints compared with the replay"),
    ("checkpoints_differing", "checkpoints differing from the replay"),
    ("duplicates_byte_identical", "extra copies of an event, byte-identical (replays)"),
    ("duplicates_byte_different", "extra copies of an event, differing in any byte"),
    ("kills", "worker SIGKILLs"),
    ("zombies", "zombie workers (frozen past the session timeout, resumed)"),
    ("pauses", "other worker freezes past the session timeout"),
    ("rebalances", "group membership changes"),
    ("outages", "outages (Redis, broker, worker-broker partitions)"),
    ("hostile", "hostile records published"),
    ("records", "records published (turns + hostile)"),
]


def _num(v: object) -> float | int:
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, (int, float)):
        return v
    return 0


def _words(v: object) -> str:
    """A composite value (dict/list) as one string field of the results file."""
    if isinstance(v, dict):
        return ", ".join(f"{k}: {_words(x)}" for k, x in v.items()) or "none"
    if isinstance(v, list):
        return ", ".join(_words(x) for x in v) or "none"
    if isinstance(v, float) and v == int(v):
        return str(int(v))
    return str(v)


def ledger(r: dict) -> dict:
    """One scenario's results: its ledger (harness counts), its faults, the system's counters."""
    x = r.get("extra", {})
    dl = dict(r.get("dead_lettered") or {})
    out = {
        "ok": bool(r.get("ok")),
        "result": "PASS" if r.get("ok") else "FAIL",
        "seconds": _num(r.get("seconds", 0)),
        "started_at": r.get("started_at", "?"),
        "command": r.get("command", "?"),
        "machine": r.get("machine", "?"),
        "rerun_of": r.get("rerun_of") or "",
        "conversations": _num(r.get("conversations", 0)),
        "dead_lettered": dl,
        "dead_lettered_total": sum(dl.values()),
        "dead_lettered_by_reason": _words(dl),
        "checkpoints_compared": _num(r.get("states_checked", 0)),
        "checkpoints_differing": _num(r.get("states_differing", 0)),
        "max_abs_diff": float(r.get("max_abs_diff", 0.0)),
        "system_counters": {k: _num(v) for k, v in (r.get("system_counters") or {}).items()},
        "problems": list(r.get("problems") or []),
    }
    for field, _ in LEDGER:
        out.setdefault(field, _num(r.get(field, 0)))
    out["kills_by_point"] = _words(r.get("kills_by_point") or {})
    out["outage_kinds"] = _words(r.get("outage_kinds") or [])
    details: dict = {}
    for k, v in x.items():
        if k == "fleet_events":
            continue
        # a sub-ledger (e.g. the sink's) keeps its numbers as numbers, one field each
        parts = v.items() if isinstance(v, dict) and v and all(isinstance(y, (int, float)) for y in v.values()) \
            else [(None, v)]
        for kk, vv in parts:
            key = k if kk is None else f"{k}_{kk}"
            details[key] = _num(vv) if isinstance(vv, (int, float)) and not isinstance(vv, bool) else _words(vv)
    out["details"] = details
    out["fleet_events"] = list(x.get("fleet_events") or [])
    return out


def build_results(scale: str, picked: dict[str, dict], source: str) -> dict:
    names = [n for n in ORDER if n in picked] + sorted(n for n in picked if n not in ORDER)
    scen = {n: ledger(picked[n]) for n in names}
    totals = {f: sum(_num(scen[n][f]) for n in names) for f, _ in LEDGER}
    totals["dead_lettered_total"] = sum(scen[n]["dead_lettered_total"] for n in names)
    totals["checkpoints_compared"] = sum(scen[n]["checkpoints_compared"] for n in names)
    totals["checkpoints_differing"] = sum(scen[n]["checkpoints_differing"] for n in names)
    totals["max_abs_diff"] = max((scen[n]["max_abs_diff"] for n in names), default=0.0)
    totals["minutes"] = sum(scen[n]["seconds"] for n in names) / 60
    ok = bool(names) and all(scen[n]["ok"] for n in names)
    starts = sorted(scen[n]["started_at"] for n in names)
    return {
        "run": {"scale": scale, "ok": ok, "result": "all scenarios passed" if ok else "FAILURES (see below)",
                "scenarios": len(names), "first_start": starts[0] if starts else "?",
                "last_start": starts[-1] if starts else "?",
                "machines": "; ".join(sorted({scen[n]["machine"] for n in names})),
                "commands": "; ".join(sorted({scen[n]["command"] for n in names})),
                "source": source, "not_run": ", ".join(n for n in ORDER if n not in picked) or ""},
        "order": names,
        "totals": totals,
        "scenarios": scen,
    }


# ----------------------------------------------------------------------------- RELIABILITY.md


def _figure_module():
    sys.path.insert(0, str(REPO))
    from benchmarks import figures

    return figures


class Marks:
    """Writes a figure marker whose text is rendered from the results file itself."""

    def __init__(self, results: dict, file: str):
        self.results = results
        self.file = file
        self.figures = _figure_module()

    def __call__(self, path: str, fmt: str = "", suffix: str = "") -> str:
        value = self.figures.lookup(self.results, path)
        spec = f":{fmt}" + (f"|{suffix}" if suffix else "") if fmt or suffix else ""
        return f"<!--fig {self.file}:{path}{spec}-->{self.figures.render_value(value, fmt, suffix)}<!--/fig-->"


def _q(name: str) -> str:
    """A key usable in a figure path (quoted when it has dots)."""
    return f'"{name}"' if "." in name else name


DETAIL_ROWS: dict[str, list[tuple[str, str]]] = {  # scenario (or prefix_) -> (details key, label)
    "kill9": [
        ("sink_rows", "pgvector sink: rows in the table at the end (`evostream sink`, SIGKILLed and restarted)"),
        ("sink_kills", "pgvector sink: SIGKILLs"),
        ("sink_missing", "pgvector sink: rows missing vs an independent read of the topic"),
        ("sink_extra", "pgvector sink: rows extra (duplicates, resurrected deletes)"),
        ("sink_vector_differs", "pgvector sink: rows whose vector differs from the topic's")],
    "store_": [
        ("held_workers", "workers that held and reported the store lost (`/readyz` 503)"),
        ("embedded_before_switch", "turns embedded before the fault and the switch"),
        ("embedded_on_reset_memory", "turns embedded on a reset or rewound memory"),
        ("rebuild_turns", "turns applied by `evostream rebuild --into NEW`"),
        ("rebuild_turns_per_s", "rebuild rate (turns/s, this machine, while the workers held)"),
        ("rebuild_progress_lines", "rebuild progress lines with an ETA"),
        ("rebuilt_states", "rebuilt conversation states"),
        ("rebuilt_states_bit_for_bit", "... equal to the offline replay bit for bit"),
        ("catch_up_turns", "turns applied by the catch-up rebuild after the old workers stopped")],
}


def scenario_rows(f: Marks, name: str, r: dict) -> list[tuple[str, str]]:
    """Scenario-specific rows (on top of the ledger): numbers from the scenario's details."""
    p = f"scenarios.{name}"
    d = r["details"]

    def det(key: str, label: str, fmt: str = "", suffix: str = "") -> list[tuple[str, str]]:
        return [(label, f(f"{p}.details.{_q(key)}", fmt, suffix))] if key in d else []

    rows: list[tuple[str, str]] = []
    if name == "kill9":
        rows += [("  by crash window", f(f"{p}.kills_by_point"))]
        rows += det("restarts", "restarts") + det("streamed_during_kills", "turns published while the kills went on")
        rows += det("kills_not_done", "planned kills not done (stream ended first)")
    if name == "rebalance_zombie":
        rows += det("zombie_conflicts", "stale commits refused per zombie (system counter)")
        rows += det("conflicts_by_worker", "compare-and-set conflicts per worker process (system counter)")
        rows += det("zombie_not_frozen", "armed workers that never froze (stream ended first)")
    if name == "redis_outage":
        rows += [("outage kinds", f(f"{p}.outage_kinds"))]
        rows += det("readyz_paused_observations", "`/readyz` answers saying paused, per worker")
        rows += det("restarts", "worker restarts")
    if name in ("broker_pause", "broker_partition"):
        rows += [("fault kinds", f(f"{p}.outage_kinds"))]
        rows += det("readyz_unready_observations", "`/readyz` answers saying not ready during the pause, per worker")
        rows += det("cut_off_worker_reported_unready", "cut-off worker reported itself not ready, per round")
        rows += det("others_took_over", "the other worker took over while the victim was cut off, per round")
    if name == "production_faults":
        rows += det("tenants", "tenants (same conversation ids, different content)")
        rows += det("evicted_keys", "checkpoint keys evicted by hand")
        rows += det("quarantined_turns", "turns quarantined (dead-lettered `checkpoint_corrupt`)")
        rows += det("partitions_stalled_by_one_conversation", "partitions stalled by one bad conversation")
        rows += det("deletes", "conversations deleted") + det("resurrected", "deleted conversations resurrected")
        rows += det("cross_tenant_leaks", "cross-tenant leaks (embedding equal to the other tenant's)")
    if name == "hostile_input":
        rows += det("valid_generated_turns", "valid generated turns processed")
        rows += det("valid_generated_deletes", "valid generated deletes processed")
    for prefix, pairs in DETAIL_ROWS.items():
        if name == prefix or (prefix.endswith("_") and name.startswith(prefix)):
            rows += [row for key, label in pairs for row in det(key, label)]
    if name == "memory_ttl":
        rows += det("cache_budget_bytes", "state cache budget (bytes)")
        rows += det("peak_cache_bytes", "peak `evostream_state_cache_bytes` (system gauge, bytes)", ".0f")
        rows += det("peak_cache_entries", "peak cached states (system gauge)", ".0f")
        rows += det("all_states_bytes", "all final states together (bytes)")
        rows += det("rss_warm_bytes", "RSS after warm-up (bytes)")
        rows += det("rss_idle_growth_bytes", "RSS growth while the idle conversations streamed (bytes)")
        rows += det("rss_growth_bytes", "RSS growth over the whole run, peak (bytes)")
        rows += det("state_ttl_s", "state TTL (s)")
        rows += det("idle_expired_after_s", "idle states gone from Redis after (s)")
        rows += det("idle_expired_while_active_streamed", "... while the active conversations were still streaming")
    return rows


def render(results: dict, file: str) -> str:
    f = Marks(results, file)
    run, names = results["run"], results["order"]
    out: list[str] = []
    w = out.append
    w("# RELIABILITY")
    w("")
    w("<!-- generated by scripts/chaos_report.py from the chaos suite's ledgers; do not edit by hand. "
      f"Every figure below is a marker into benchmarks/results/{file} (tests/test_figures.py checks them). -->")
    w("")
    w("**The promise:** whatever happens to a worker, each conversation's memory equals applying each of "
      "its turns exactly once, in order, and every turn's embedding reaches the embeddings topic at least "
      "once, byte-identical each time. A record that cannot be processed is dead-lettered with a reason.")
    w("")
    w(f"**Result: {f('run.result')}** -- scale `{f('run.scale')}`, {f('run.scenarios')} scenario(s), "
      f"{f('totals.minutes', '.1f')} min of scenarios.")
    if run["scale"] != "long":
        w("")
        w("> Generated from the **short** run (the CI default); the long run "
          "(`make chaos-long`) has not produced ledgers in this file yet.")
    w("")
    w(f"- run: {f('run.first_start')} .. {f('run.last_start')} (UTC, scenario starts)")
    w(f"- machine: {f('run.machines')}")
    w(f"- command: {f('run.commands')}")
    w(f"- ledgers: `benchmarks/results/{file}`, picked from `{f('run.source')}` by `python scripts/chaos_report.py`")
    w("")
    w("## How it is checked")
    w("")
    w("Everything runs against the real tansu Kafka-protocol broker, a real Redis (Valkey) with AOF "
      "persistence and real `evostream worker` processes (faust + aiokafka + the seeded tiny "
      "EvoEmbedding checkpoint); nothing is mocked. After each scenario the harness reads the "
      "embeddings topic, the dead-letter topic and Redis, and counts (the *ledger*):")
    w("")
    w("- **applied**: turns whose embedding was delivered and equals an **offline replay** "
      "(`tests/support/oracle.py`: the engine steps each conversation alone, one turn per call, no Kafka, "
      "no Redis, no restarts) within 1e-4 (the worker batches conversations into padded passes, so the last "
      "float bits differ); a turn embedded with a different vector counts as *differing*, a turn with no "
      "embedding and no dead letter as *lost*;")
    w("- **checkpoints compared**: each conversation's checkpoint in Redis against the offline state (same "
      "seq, segment bookkeeping and number of latents, exactly; latents within 1e-4): a turn applied twice "
      "or skipped changes these. Only where it says so is \"applied exactly once\" proved by the checkpoint "
      "as well as by the embedding;")
    w("- **dead-lettered**, by reason code, from the dead-letter topic; **expired**: conversations whose "
      "state the harness saw disappear from Redis;")
    w("- **duplicates**, compared as bytes: an extra copy equal to the first byte for byte (an outbox "
      "replay; delivery is at-least-once, consumers deduplicate on (conversation_id, seq)) or differing in "
      "any byte (a recomputation, e.g. a zombie's write). A byte-different copy fails the scenario.")
    w("")
    w("Counts labelled *system counter* are the workers' own metrics, not the harness' observations.")
    w("")
    w("## Totals")
    w("")
    w("| | " + " | ".join(f"`{n}`" for n in names) + " | total |")
    w("|---|" + "---|" * (len(names) + 1))
    for field, label in LEDGER:
        w(f"| {label} | " + " | ".join(f(f"scenarios.{n}.{field}") for n in names)
          + f" | **{f(f'totals.{field}')}** |")
    w("| checkpoints compared / differing | " + " | ".join(
        f"{f(f'scenarios.{n}.checkpoints_compared')} / {f(f'scenarios.{n}.checkpoints_differing')}" for n in names)
        + f" | **{f('totals.checkpoints_compared')} / {f('totals.checkpoints_differing')}** |")
    w("| max abs difference vs offline | " + " | ".join(f(f"scenarios.{n}.max_abs_diff", ".3g") for n in names)
      + f" | **{f('totals.max_abs_diff', '.3g')}** |")
    w("| result | " + " | ".join(f(f"scenarios.{n}.result") for n in names) + f" | **{f('run.result')}** |")
    w("")
    w("## Scenarios")
    for n in names:
        r = results["scenarios"][n]
        p = f"scenarios.{n}"
        w("")
        w(f"### {TITLES.get(n, n)} (`{n}`)")
        if r["rerun_of"]:
            w("")
            w(f"*Rerun alone at {f(p + '.started_at')} after the complete run {f(p + '.rerun_of')}.*")
        w("")
        if n in WHAT:
            w(WHAT[n])
            w("")
        w("| | |")
        w("|---|---|")
        w(f"| result | {f(p + '.result')} |")
        w(f"| duration (s) | {f(p + '.seconds', '.0f')} |")
        w(f"| conversations | {f(p + '.conversations')} |")
        for field, label in LEDGER:
            w(f"| {label} | {f(f'{p}.{field}')} |")
        w(f"| dead letters by reason | {f(p + '.dead_lettered_by_reason')} |")
        w(f"| checkpoints compared / differing | {f(p + '.checkpoints_compared')} / {f(p + '.checkpoints_differing')} |")
        w(f"| max abs difference vs offline replay | {f(p + '.max_abs_diff', '.3g')} |")
        for k, v in scenario_rows(f, n, r):
            w(f"| {k} | {v} |")
        for metric in r["system_counters"]:
            w(f"| `{metric}` (system counter, sum over workers read) | {f(f'{p}.system_counters.{_q(metric)}')} |")
        if r["problems"]:
            w("")
            w("Problems reported:")
            w("")
            for i in range(len(r["problems"])):
                w(f"- {f(f'{p}.problems.{i}')}")
        if r["fleet_events"]:
            w("")
            w("<details><summary>worker timeline</summary>")
            w("")
            for i in range(len(r["fleet_events"])):
                w(f"- {f(f'{p}.fleet_events.{i}')}")
            w("")
            w("</details>")
    if run["not_run"]:
        w("")
        w(f"**Not run at this scale:** {f('run.not_run')}.")
    w("")
    w("## Found on the way")
    w("")
    w("History of earlier runs (what they found and what was fixed); not figures of this run.")
    w("")
    for line in FINDINGS:
        w(f"- {line}")
    w("")
    w("## Limits of what this proves")
    w("")
    for line in LIMITS:
        w(f"- {line}")
    w("")
    w("## Reproduce")
    w("")
    w("```")
    w("make test                                   # includes the short chaos run")
    w(".venv/bin/python -m pytest tests/test_chaos.py -q -x -m chaos          # short only")
    w("make chaos-long                             # EVOSTREAM_CHAOS_SCALE=long, then this report")
    w("```")
    w("")
    w("Results accumulate in `EVOSTREAM_CHAOS_REPORT` (default `.run/chaos-report.jsonl`); "
      "`python scripts/chaos_report.py --scale short|long` picks the newest line per scenario, writes "
      "`benchmarks/results/chaos_<scale>.json` and renders this file from it.")
    w("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--input", type=Path,
                    default=Path(os.environ.get("EVOSTREAM_CHAOS_REPORT") or REPO / ".run" / "chaos-report.jsonl"))
    ap.add_argument("--output", type=Path, default=REPO / "RELIABILITY.md")
    ap.add_argument("--results-dir", type=Path, default=REPO / "benchmarks" / "results")
    ap.add_argument("--scale", choices=["auto", "short", "long"], default="auto")
    args = ap.parse_args(argv)
    if not args.input.exists():
        print(f"error: {args.input} does not exist: run the chaos suite first", file=sys.stderr)
        return 1
    scale, picked = pick(load(args.input), args.scale)
    if not picked:
        print(f"error: no {scale} results in {args.input}", file=sys.stderr)
        return 1
    try:
        shown = str(args.input.resolve().relative_to(REPO))
    except ValueError:
        shown = str(args.input)
    results = build_results(scale, picked, shown)
    file = f"chaos_{scale}.json"
    args.results_dir.mkdir(parents=True, exist_ok=True)
    (args.results_dir / file).write_text(json.dumps(results, indent=1, sort_keys=False) + "\n")
    args.output.write_text(render(results, file))
    print(f"wrote {args.results_dir / file} and {args.output} ({scale} run, {len(picked)} scenarios)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
