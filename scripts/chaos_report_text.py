"""The words of RELIABILITY.md (scripts/chaos_report.py renders the numbers): scenario order,
titles, what each scenario does, what earlier runs found, and the limits of the proof. No
figure of a run lives here: every number of a run comes from its ledger."""

from __future__ import annotations

ORDER = ["kill9", "rebalance_zombie", "redis_outage", "hostile_input", "memory_ttl", "broker_pause",
         "broker_partition", "production_faults", "store_flushall", "store_old_snapshot"]

TITLES = {
    "kill9": "1. Kill -9 at random moments and in every crash window",
    "rebalance_zombie": "2. Rebalances and zombie workers",
    "redis_outage": "3. Redis outages",
    "hostile_input": "4. Hostile input",
    "memory_ttl": "5. Memory bounds and idle expiry",
    "broker_pause": "6. Broker frozen past the session timeout",
    "broker_partition": "7. One worker partitioned from the broker",
    "production_faults": "8. Evicted keys, deletes racing a zombie, two tenants with one id",
    "store_flushall": "9. Redis emptied mid-stream, memories rebuilt from the turns topic",
    "store_old_snapshot": "10. Redis restarted from an old snapshot, memories rebuilt from the turns topic",
}

_STORE = (
    "Two workers stream conversations into a Redis of the scenario's own (so that the fault "
    "touches nothing else of the suite). Half-way through, the store {fault}. The workers must "
    "notice (the store's identity key and their own watermarks, `stream/state/epoch.py`), hold "
    "their batch unacknowledged and say why (`/readyz` 503, `\"store\": \"lost\"`); traffic keeps "
    "coming and no turn may be embedded on a memory the store forgot (`embedded_on_reset_memory` "
    "counts any that were, or that differ from the offline replay). The operator then runs the "
    "real command, `evostream rebuild --into NEW`, while the workers hold: every rebuilt state must "
    "equal an offline replay of the retained turns bit for bit (`torch.equal`, no tolerance). Then "
    "the switch: the old workers stop, the rebuild runs again to catch up, and new workers start "
    "on NEW and finish the stream; every turn must end embedded exactly as offline.")

WHAT = {
    "store_flushall": _STORE.format(fault="is emptied with `FLUSHALL` (a lost volume, an empty replica promoted)"),
    "store_old_snapshot": _STORE.format(
        fault="is restarted from an RDB snapshot taken earlier in the run (a restore from backup): "
              "its memories are behind the turns the workers applied"),
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
        "Redis and no embedding after its tombstone. Every copy of an event is compared with the first "
        "as bytes: the zombie's recomputed copy would differ in them (issue #20)."),
    "kill9": (
        "Worker processes are SIGKILLed while a producer streams interleaved conversations: from "
        "outside at random moments, and from inside through the test harness's fault injection "
        "(`devtools/faults.py`, `EVOSTREAM_FAULT_POINT`) right after the model step, between the "
        "Redis checkpoint and the emit, between the emit and the outbox ack, and between the ack "
        "and the offset commit. Each killed worker is restarted. Checkpoints compact every 3 turns "
        "so that replays also cross full-state compactions. Meanwhile `evostream sink` indexes the "
        "embeddings topic into the bundled PostgreSQL (pgvector); it is SIGKILLed once mid-stream "
        "and restarted, and at the end its table must equal an independent read of the topic: no "
        "row missing, none extra, every vector equal."),
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
    ("Expiry (`STATE_TTL_S`) is exercised by the memory scenario only (`memory_ttl`): there the "
    "states expire by design, so its checkpoints are not compared (the ledger says 0) and its "
    "turns count as applied on their embeddings alone. The other scenarios keep states for the "
    "whole run. A Redis replica failover is injected in `tests/test_redis_topologies.py` "
    "(Sentinel), not here; that the `replicas` durability (WAIT) holds the output until a "
    "replica has the commit is proved in `tests/test_delivery_contract.py`."),
    ("Broker faults are injected on one single-node broker (tansu, memory storage): a frozen broker "
    "and a worker partitioned from it. Leader changes and partial broker failures of a multi-node "
    "Kafka cluster are not reproduced here."),
    ("Offline and streamed floats are compared within 1e-4 (batched padded passes vs one turn at a "
    "time); bookkeeping (seq, segment tokens, number of latents) is compared exactly. Copies of "
    "one event are compared as bytes, not within a tolerance."),
    ("Counts labelled *system counter* are the workers' own Prometheus metrics (e.g. "
    "`evostream_checkpoint_conflicts_total`, stale commits the compare-and-set refused), summed "
    "over the workers alive when they were read: the system's word, not the harness' observation."),
]
