#!/usr/bin/env python3
"""Render the fault-injection results (tests/test_chaos.py) into RELIABILITY.md.

Every scenario of the chaos suite appends one JSON line to `EVOSTREAM_CHAOS_REPORT`
(default `.run/chaos-report.jsonl`). This script picks, per scenario, the newest line of the
chosen scale (default: `long` if the file has any long run, else `short`) and writes what was
proved, the per-scenario numbers, the totals, the command, the date and the machine. Every
number in the output comes from the file; nothing is typed in.

    python scripts/chaos_report.py [--input FILE] [--output RELIABILITY.md] [--scale auto|short|long]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ORDER = ["kill9", "rebalance_zombie", "redis_outage", "hostile_input", "memory_ttl", "broker_pause",
         "broker_partition", "production_faults"]

TITLES = {
    "kill9": "1. Kill -9 at random moments and in every crash window",
    "rebalance_zombie": "2. Rebalances and zombie workers",
    "redis_outage": "3. Redis outages",
    "hostile_input": "4. Hostile input",
    "memory_ttl": "5. Memory bounds and idle expiry",
    "broker_pause": "6. Broker frozen past the session timeout",
    "broker_partition": "7. One worker partitioned from the broker",
    "production_faults": "8. Evicted keys, deletes racing a zombie, two tenants with one id",
}

WHAT = {
    "production_faults": (
        "Two tenants stream conversations with the SAME ids and different content through two "
        "workers. Mid-stream one checkpoint key (base, deltas or meta, in turn) of some "
        "conversations is deleted by hand, as Redis' `volatile-*` eviction policies would. One "
        "worker freezes itself right after a model step (a zombie); while it is frozen the other "
        "takes over, finishes the stream, and some conversations of the second tenant are "
        "deleted; then the zombie resumes and tries its stale commit. Workers commit with "
        "`EVOSTREAM_REDIS_DURABILITY=aof` (WAITAOF). Every turn of a damaged conversation must be "
        "either embedded exactly as offline or dead-lettered `checkpoint_corrupt`; every other "
        "conversation of both tenants must be exact; a deleted conversation must have no state in "
        "Redis and no embedding after its tombstone."),
    "kill9": (
        "Worker processes are SIGKILLed while a producer streams interleaved conversations: from "
        "outside at random moments, and from inside through the test harness's fault injection "
        "(`devtools/faults.py`, `EVOSTREAM_FAULT_POINT`) right after the model step, between the "
        "Redis checkpoint and the emit, between the emit and the outbox ack, and between the ack "
        "and the offset commit. Each killed worker is restarted. Checkpoints compact every 3 turns "
        "so that replays also cross full-state compactions."),
    "rebalance_zombie": (
        "Workers join and leave mid-stream (1 -> 3 -> 2 per round, the oldest member leaving "
        "gracefully). In every round the newest worker is armed to freeze itself with SIGSTOP "
        "right after a model step (its batch computed, not yet checkpointed); it stays frozen past "
        "the session timeout while the others take over its partitions and advance every "
        "conversation it held, and is then resumed (SIGCONT): its stale checkpoint write must be "
        "refused by the compare-and-set on seq. The long run also freezes random workers from "
        "outside, at random moments, past the session timeout. Checkpoints compact every 3 turns."),
    "redis_outage": (
        "Redis is taken away mid-stream and brought back on the same port with its data (AOF "
        "persistence): stopped (SIGTERM), and in the long run also SIGKILLed and frozen "
        "(SIGSTOP, so in-flight commits time out and are retried). The workers must pause "
        "(`/readyz` reports `paused`), never exit or restart, and resume by themselves."),
    "hostile_input": (
        "Hypothesis-generated malformed and adversarial records (`tests/strategies.py` "
        "`hostile_records`: invalid UTF-8, oversized values, deep nesting, invalid JSON, wrong "
        "types, unknown fields and types, empty turns, bad roles, out-of-range seqs, missing keys, "
        "keys that disagree with the body) are mixed into good traffic. Each bad record must reach "
        "the dead-letter topic with exactly the expected reason (matched by its original key and "
        "value bytes); the valid generated events (turns with arbitrary Unicode and seqs, deletes) "
        "must be processed; the good conversations must be exact; the worker must stay up."),
    "memory_ttl": (
        "Many idle conversations, then a few active ones, through one worker with a small state "
        "cache budget (`EVOSTREAM_CACHE_MAX_BYTES`) and a short state TTL "
        "(`EVOSTREAM_STATE_TTL_S`). The `evostream_state_cache_bytes` gauge is sampled throughout "
        "and must never exceed the budget; process RSS (`/proc/PID/status`) must not grow with "
        "the number of conversations; idle states must vanish from Redis while active ones keep "
        "going, and every key once the stream stops; every embedding must match the offline "
        "replay."),
    "broker_pause": (
        "A broker of the scenario's own (tansu behind a test-controlled TCP proxy, "
        "`tests/support/kafka_proxy.py`, so the suite's shared broker is never touched) is frozen "
        "with SIGSTOP past the group session timeout while a producer streams, then resumed with "
        "SIGCONT; it keeps its in-memory data. Two workers. Each must report `/readyz` 503 "
        "(`broker: unreachable`) while the broker is frozen, never exit, become ready again and "
        "finish the stream: a produce that fails during the pause is retried "
        "(`evostream_emit_retries_total`), and records are acknowledged only after their embeddings "
        "are delivered."),
    "broker_partition": (
        "One of two workers is cut off from Kafka by the proxy (`blackhole`: connections kept, "
        "nothing forwarded; `cut`: connections closed and refused) while Redis stays reachable. "
        "It must report itself not ready; past the session timeout the other worker takes its "
        "partitions over and checkpoints everything published so far while the victim is still cut "
        "off (a batch the victim had checkpointed but not emitted is re-emitted from the outbox); "
        "healed, the victim rejoins. Checkpoints compact every 3 turns."),
}

FINDINGS = [
    ("**Zombie taken for a retry (fixed).** The long rebalance run found one (conversation, seq) "
    "whose two embedding events carried different vectors. A zombie had recomputed a turn the new "
    "owner had already committed; its state deltas were bit-identical to the owner's (same batch "
    "shape in the memory pass) but its embedding was not (another batch shape in the retrieval "
    "pass). The commit script recognises a retry whose first reply was lost by (seq, digest of the "
    "deltas), so it answered the zombie ALREADY_APPLIED and the zombie emitted its own embedding "
    "next to the winner's. Fixed in `stream/state/store.py`: the digest is keyed per store "
    "instance, so only the same writer's retry matches; any other writer gets STALE, re-reads and "
    "re-emits the winner's event from the outbox. Regression test: "
    "`test_zombie_with_bit_identical_deltas_is_refused_not_taken_for_a_retry`."),
    ("`/readyz` stayed 200 while a worker held no partitions (after a revoke, during a rebalance, or "
    "in a consumer group that never re-synced), so neither an orchestrator nor the harness could see a "
    "stuck group. Fixed in `stream/runtime/worker.py`: readiness drops on every revoke and comes back with the "
    "next assignment. Found by the rebalance scenario."),
    ("tansu 0.6.0 (the local broker) keeps a group leader that leaves (LeaveGroup) in the middle of a "
    "rebalance as the leader of the next generation: the remaining members re-join that generation as "
    "followers forever and the group never syncs again. A broker bug, not evostream's; the harness "
    "only lets a worker leave once the group is stable (every member ready). Real Kafka re-elects."),
    ("The first RSS check failed a long run and then a short one without any leak: glibc keeps "
    "freed activation buffers as a high-water mark, so RSS jumped whenever a batch of a new, larger "
    "shape came by. Probed over thousands of turns, RSS is flat once the worker runs with "
    "`MALLOC_MMAP_THRESHOLD_=65536` (large blocks mapped on their own and returned when freed); the "
    "memory scenario now runs its worker that way and takes the baseline after a warm-up third of "
    "the idle conversations. The cache gauge remains the exact bound."),
    ("faust's partition assignor may give a third member no partition at all, so a worker armed "
    "to become a zombie can sit idle; the scenario lets the oldest member leave first, after which "
    "both remaining members own partitions."),
    ("A state TTL shorter than the worker's processing lag expires conversations that still have "
    "turns queued: their next turn starts a new memory (a seq gap, logged and counted in "
    "`evostream_seq_gaps_total`). The memory scenario publishes each idle conversation's turns back "
    "to back and keeps the TTL well above the step time; production TTLs are days."),
]

FINDINGS += [
    ("The first long run of 2026-11-30 failed the hostile scenario without losing anything: since "
    "issue #8 a dead letter of a record near the 1,000,000-byte input limit carries only a prefix "
    "of the original (plus its length and SHA-256) so that it fits the broker's message limit, and "
    "the harness still matched dead letters by the full original bytes. It now matches by the "
    "SHA-256 of the originals; the scenario was rerun alone at the long scale."),
    ("Since issue #7 every conversation keeps a small marker (generation, last seq) that outlives "
    "its state by `MARKER_TTL_S`, so that expiry is told apart from a gap and deletes stay final. "
    "The memory scenario's \"every key expires\" check therefore waits for the state keys, and runs "
    "its workers with `MARKER_TTL_S` equal to the state TTL so that the markers go too."),
]

LIMITS = [
    ("Exactly-once through Kafka transactions is not exercised: the tansu broker rejects "
    "InitProducerId. Effectively-once comes from the seq compare-and-set in Redis plus the outbox."),
    ("Deletes are tombstones (a marker with the generation and last seq): a replay of a partition "
    "segment holding turns and then their delete no longer re-applies those turns to an emptied "
    "memory; they are recognised as deleted and dropped. The tombstone lives `MARKER_TTL_S` "
    "(30 days by default): a writer frozen for longer than that could still write once."),
    ("Expiry (`STATE_TTL_S`) is not part of the chaos runs (every conversation of a run would "
    "expire with it); it is covered by `tests/test_production_faults.py`. A Redis replica "
    "failover (the `WAIT` durability) is not injected: the local Redis has no replica."),
    ("Broker faults are injected on one single-node broker (tansu, memory storage): a frozen broker "
    "and a worker partitioned from it. Leader changes and partial broker failures of a multi-node "
    "Kafka cluster are not reproduced here."),
    ("Offline and streamed floats are compared within 1e-4 (batched padded passes vs one turn at a "
    "time); bookkeeping (seq, segment tokens, number of latents) is compared exactly."),
]

TOTAL_FIELDS = [
    ("turns", "turns streamed (each applied exactly once)"),
    ("records", "records published (turns + hostile)"),
    ("kills", "worker SIGKILLs"),
    ("zombies", "zombie workers (frozen past the session timeout, resumed)"),
    ("pauses", "other worker freezes past the session timeout"),
    ("rebalances", "group membership changes"),
    ("outages", "outages (Redis, broker, worker-broker partitions)"),
    ("hostile", "hostile records"),
    ("lost", "turns lost (no embedding event)"),
    ("states_checked", "conversation checkpoints compared with the offline replay"),
    ("states_differing", "checkpoints differing from the offline replay"),
    ("duplicates", "duplicate embedding events (at-least-once replays)"),
    ("non_identical", "(conversation, seq) whose copies differ"),
    ("conflicts", "stale checkpoint writes refused by the compare-and-set"),
]


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
    complete = [rid for rid in order if all(n in runs[rid] for n in ORDER)]
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


def fmt(v: object) -> str:
    if isinstance(v, float):
        if v == int(v) and abs(v) < 1e15:
            return str(int(v))
        return f"{v:.3g}"
    if isinstance(v, dict):
        return ", ".join(f"{k}: {fmt(x)}" for k, x in v.items()) or "-"
    if isinstance(v, list):
        return ", ".join(fmt(x) for x in v) or "-"
    return str(v)


def mib(v: object) -> str:
    try:
        return f"{float(v) / 2**20:.1f} MiB"
    except (TypeError, ValueError):
        return "-"


def scenario_rows(r: dict) -> list[tuple[str, str]]:
    x = r.get("extra", {})
    rows = [
        ("result", "PASS" if r.get("ok") else "FAIL"),
        ("duration", f"{r.get('seconds', 0):.0f} s"),
        ("conversations / turns streamed", f"{r.get('conversations', 0)} / {r.get('turns', 0)}"),
        ("records published", fmt(r.get("records", 0))),
    ]
    name = r.get("scenario")
    if name == "kill9":
        rows += [("worker SIGKILLs", fmt(r.get("kills", 0))),
                 ("  by crash window", fmt(r.get("kills_by_point", {}))),
                 ("restarts", fmt(x.get("restarts", 0))),
                 ("turns published while the kills went on", fmt(x.get("streamed_during_kills", "-")))]
        if x.get("kills_not_done"):
            rows.append(("planned kills not done (stream ended first)", fmt(x["kills_not_done"])))
    if name == "rebalance_zombie":
        rows += [("membership changes", fmt(r.get("rebalances", 0))),
                 ("zombies resumed after their partitions moved", fmt(r.get("zombies", 0))),
                 ("stale commits refused per zombie (CAS conflicts)", fmt(x.get("zombie_conflicts", []))),
                 ("external freezes past the session timeout", fmt(r.get("pauses", 0))),
                 ("CAS conflicts per worker process", fmt(x.get("conflicts_by_worker", {})))]
        if x.get("zombie_not_frozen"):
            rows.append(("armed workers that never froze (stream ended first)", fmt(x["zombie_not_frozen"])))
    if name == "redis_outage":
        rows += [("outages", f"{r.get('outages', 0)} ({fmt(r.get('outage_kinds', []))})"),
                 ("`/readyz` answers saying paused, per worker", fmt(x.get("readyz_paused_observations", {}))),
                 ("`evostream_store_unavailable_total` (sum over workers)", fmt(x.get("store_unavailable_total", "-"))),
                 ("worker exits / restarts", f"0 / {fmt(x.get('restarts', 0))} (asserted)")]
    if name in ("broker_pause", "broker_partition"):
        rows += [("faults", f"{r.get('outages', 0)} ({fmt(r.get('outage_kinds', []))})"),
                 ("`evostream_broker_unreachable_total` (sum over workers alive at the end)",
                  fmt(x.get("broker_unreachable_total", "-"))),
                 ("`evostream_emit_retries_total` (sum over workers alive at the end)",
                  fmt(x.get("emit_retries_total", "-")))]
        if name == "broker_pause":
            rows.append(("`/readyz` answers saying not ready during the pause, per worker",
                         fmt(x.get("readyz_unready_observations", {}))))
        else:
            rows += [("cut-off worker reported itself not ready, per round", fmt(x.get("cut_off_worker_reported_unready", []))),
                     ("the other worker took over while the victim was cut off, per round",
                      fmt(x.get("others_took_over", [])))]
        rows.append(("worker exits", "0 (asserted)"))
    if name == "production_faults":
        rows += [("tenants (same conversation ids, different content)", fmt(x.get("tenants", "-"))),
                 ("checkpoint keys evicted by hand", fmt(x.get("evicted_keys", {}))),
                 ("turns quarantined (dead-lettered `checkpoint_corrupt`)", fmt(x.get("quarantined_turns", "-"))),
                 ("partitions stalled by one bad conversation", fmt(x.get("partitions_stalled_by_one_conversation", "-"))),
                 ("zombies resumed after the deletes", fmt(r.get("zombies", 0))),
                 ("conversations deleted / resurrected", f"{fmt(x.get('deletes', '-'))} / {fmt(x.get('resurrected', '-'))}"),
                 ("cross-tenant leaks (embedding equal to the other tenant's)", fmt(x.get("cross_tenant_leaks", "-"))),
                 ("stale commits refused (CAS conflicts, all workers)", fmt(r.get("conflicts", 0)))]
    if name == "hostile_input":
        rows += [("hostile records", fmt(r.get("hostile", 0))),
                 ("dead letters, by reason", fmt(x.get("dead_letters_by_reason", {}))),
                 ("valid generated turns / deletes processed",
                  f"{fmt(x.get('valid_generated_turns', '-'))} / {fmt(x.get('valid_generated_deletes', '-'))}")]
    if name == "memory_ttl":
        rows += [("state cache budget", f"{fmt(x.get('cache_budget_bytes', '-'))} bytes"),
                 ("peak `evostream_state_cache_bytes`", f"{fmt(x.get('peak_cache_bytes', '-'))} bytes"),
                 ("peak cached states / conversations", f"{fmt(x.get('peak_cache_entries', '-'))} / {r.get('conversations', 0)}"),
                 ("all final states together", mib(x.get("all_states_bytes"))),
                 ("RSS after warm-up", mib(x.get("rss_warm_bytes"))),
                 ("RSS growth while the idle conversations streamed", mib(x.get("rss_idle_growth_bytes"))),
                 ("RSS growth over the whole run (peak)", mib(x.get("rss_growth_bytes"))),
                 ("state TTL", f"{fmt(x.get('state_ttl_s', '-'))} s"),
                 ("idle states gone from Redis after", f"{fmt(x.get('idle_expired_after_s', '-'))} s"),
                 ("... while the active conversations were still streaming",
                  fmt(x.get("idle_expired_while_active_streamed", "-")))]
    rows += [("lost turns", fmt(r.get("lost", 0))),
             ("checkpoints compared / differing",
              f"{r.get('states_checked', 0)} / {r.get('states_differing', 0)}"
              + (" (states expire in this scenario; embeddings compared)" if name == "memory_ttl" else "")),
             ("duplicate embedding events (keys)", f"{r.get('duplicates', 0)} ({r.get('duplicated_keys', 0)})"),
             ("keys whose copies differ", fmt(r.get("non_identical", 0))),
             ("max abs difference vs offline replay", f"{float(r.get('max_abs_diff', 0.0)):.3g}")]
    if name in ("kill9", "redis_outage"):
        rows.append(("CAS conflicts (workers alive at the end)", fmt(r.get("conflicts", 0))))
    return rows


def render(scale: str, picked: dict[str, dict], source: Path) -> str:
    names = [n for n in ORDER if n in picked] + sorted(n for n in picked if n not in ORDER)
    runs = [picked[n] for n in names]
    ok = all(r.get("ok") for r in runs) and len(runs) > 0
    started = sorted(r.get("started_at", "") for r in runs)
    machines = sorted({r.get("machine", "?") for r in runs})
    commands = sorted({r.get("command", "?") for r in runs})
    total_s = sum(float(r.get("seconds", 0)) for r in runs)
    out: list[str] = []
    w = out.append
    w("# RELIABILITY")
    w("")
    w("<!-- generated by scripts/chaos_report.py from the chaos suite's results; do not edit by hand -->")
    w("")
    w("**The promise:** whatever happens to a worker, each conversation's memory equals applying each of "
      "its turns exactly once, in order, and every turn's embedding reaches the embeddings topic at least "
      "once, identical each time.")
    w("")
    w(f"**Result: {'all scenarios passed' if ok else 'FAILURES (see below)'}** -- scale `{scale}`, "
      f"{len(runs)} scenario(s), {total_s / 60:.1f} min of scenarios.")
    if scale != "long":
        w("")
        w("> Generated from the **short** run (the CI default); the long run "
          "(`make chaos-long`) has not produced results in this file yet.")
    w("")
    w(f"- run: {started[0] if started else '?'} .. {started[-1] if started else '?'} (UTC, scenario starts)")
    w(f"- machine: {'; '.join(machines)}")
    w(f"- command: {'; '.join(f'`{c}`' for c in commands)}")
    w(f"- results file: `{source}`; rendered {datetime.now(UTC).isoformat(timespec='seconds')} by "
      "`python scripts/chaos_report.py`")
    w("")
    w("## How it is checked")
    w("")
    w("Everything runs against the real tansu Kafka-protocol broker, a real Redis (Valkey) with AOF "
      "persistence and real `evostream worker` processes (faust + aiokafka + the seeded tiny "
      "EvoEmbedding checkpoint); nothing is mocked. After each scenario:")
    w("")
    w("- every (conversation, seq) has at least one event on the embeddings topic, and all copies of one "
      "key carry byte-identical vectors;")
    w("- every embedding equals an **offline replay** (`tests/support/oracle.py`: the engine steps each "
      "conversation alone, one turn per call, no Kafka, no Redis, no restarts) within 1e-4 (the worker "
      "batches many conversations into padded passes, so the last float bits differ);")
    w("- every conversation's checkpoint in Redis equals the offline state: same seq, same segment "
      "bookkeeping, same number of latents (a turn applied twice or skipped changes these exactly), "
      "latents within 1e-4;")
    w("- duplicates are counted, not forbidden: delivery is at-least-once and consumers deduplicate on "
      "(conversation_id, seq).")
    w("")
    w("## Totals")
    w("")
    w("| | " + " | ".join(f"`{r['scenario']}`" for r in runs) + " | total |")
    w("|---|" + "---|" * (len(runs) + 1))
    for key, label in TOTAL_FIELDS:
        vals = [r.get(key, 0) or 0 for r in runs]
        w(f"| {label} | " + " | ".join(fmt(v) for v in vals) + f" | **{fmt(sum(vals))}** |")
    diffs = [float(r.get("max_abs_diff", 0.0)) for r in runs]
    w("| max abs difference vs offline | " + " | ".join(f"{d:.3g}" for d in diffs)
      + f" | **{max(diffs) if diffs else 0:.3g}** |")
    w("| result | " + " | ".join("PASS" if r.get("ok") else "**FAIL**" for r in runs)
      + f" | **{'PASS' if ok else 'FAIL'}** |")
    w("")
    w("## Scenarios")
    for r in runs:
        name = r["scenario"]
        w("")
        w(f"### {TITLES.get(name, name)} (`{name}`)")
        if picked[name].get("rerun_of"):
            w("")
            w(f"*Rerun alone at {picked[name].get('started_at', '?')} (`{picked[name].get('command', '?')}`) after "
              f"the complete run {picked[name]['rerun_of']}; see \"Found on the way\".*")
        w("")
        if name in WHAT:
            w(WHAT[name])
            w("")
        w("| | |")
        w("|---|---|")
        for k, v in scenario_rows(r):
            w(f"| {k} | {v} |")
        if r.get("problems"):
            w("")
            w("Problems reported:")
            w("")
            for p in r["problems"]:
                w(f"- {p}")
        events = r.get("extra", {}).get("fleet_events")
        if events:
            w("")
            w("<details><summary>worker timeline</summary>")
            w("")
            w("```")
            for e in events:
                w(e)
            w("```")
            w("</details>")
    missing = [n for n in ORDER if n not in picked]
    if missing:
        w("")
        w(f"**Not run at this scale:** {', '.join(missing)}.")
    w("")
    w("## Found on the way")
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
      "`python scripts/chaos_report.py --scale short|long` renders the newest line per scenario.")
    w("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--input", type=Path,
                    default=Path(os.environ.get("EVOSTREAM_CHAOS_REPORT") or REPO / ".run" / "chaos-report.jsonl"))
    ap.add_argument("--output", type=Path, default=REPO / "RELIABILITY.md")
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
        shown = args.input.resolve().relative_to(REPO)
    except ValueError:
        shown = args.input
    args.output.write_text(render(scale, picked, shown))
    print(f"wrote {args.output} ({scale} run, {len(picked)} scenarios)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
