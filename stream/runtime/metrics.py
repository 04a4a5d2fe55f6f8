"""Prometheus metrics of one worker (own registry, so tests and several apps in one process
do not collide)."""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

_LAT = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        # issue #11: the default registry's process/platform/GC views, on our own registry
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        self.turns = Counter("evostream_turns_applied_total", "turns applied to memory and embedded", registry=r)
        self.records = Counter("evostream_records_consumed_total", "records read from the turns topic", registry=r)
        self.duplicates = Counter("evostream_turns_duplicate_total", "turns skipped as already applied (replays)", registry=r)
        self.reemitted = Counter("evostream_embeddings_reemitted_total", "embeddings re-emitted from the checkpoint outbox", registry=r)
        self.gaps = Counter("evostream_seq_gaps_total", "turns applied after a seq gap (gap policy 'apply')", registry=r)
        self.dead_letters = Counter("evostream_dead_letters_total", "records sent to the dead-letter topic", ["reason"], registry=r)
        self.deletes = Counter("evostream_conversations_deleted_total", "conversation deletes applied", registry=r)
        self.conflicts = Counter("evostream_checkpoint_conflicts_total", "commits refused by compare-and-set (another writer advanced the state)", registry=r)
        self.store_unavailable = Counter("evostream_store_unavailable_total", "times Redis was unavailable and consumption paused", registry=r)
        self.batch_size = Histogram("evostream_batch_turns", "turns per micro-batch", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
        self.step_s = Histogram("evostream_step_seconds", "model step latency per batch", buckets=_LAT, registry=r)
        self.load_s = Histogram("evostream_state_load_seconds", "checkpoint load latency per batch", buckets=_LAT, registry=r)
        self.checkpoint_s = Histogram("evostream_checkpoint_seconds", "checkpoint commit latency per batch", buckets=_LAT, registry=r)
        self.emit_s = Histogram("evostream_emit_seconds", "produce+delivery latency per batch", buckets=_LAT, registry=r)
        self.batch_s = Histogram("evostream_batch_seconds", "whole batch latency", buckets=_LAT, registry=r)
        self.turn_latency_s = Histogram("evostream_turn_to_embedding_seconds", "record timestamp to embedding delivered", buckets=_LAT, registry=r)
        self.cache_hits = Counter("evostream_state_cache_hits_total", "state cache hits", registry=r)
        self.cache_misses = Counter("evostream_state_cache_misses_total", "state cache misses", registry=r)
        self.cache_bytes = Gauge("evostream_state_cache_bytes", "bytes of states held in memory", registry=r)
        self.cache_entries = Gauge("evostream_state_cache_entries", "states held in memory", registry=r)
        self.lag = Gauge("evostream_consumer_lag", "records behind the partition end", ["partition"], registry=r)
        self.paused = Gauge("evostream_paused", "1 while consumption is paused (store or broker unavailable)", registry=r)
        self.memory_origin = Counter("evostream_embeddings_by_memory_total", "embeddings emitted, by how their memory relates to the conversation (continued, new, reset_after_expiry, reset_after_delete, reset_by_operator)", ["memory"], registry=r)
        self.quarantined = Counter("evostream_quarantined_turns_total", "turns dead-lettered because their conversation's checkpoint is corrupt, foreign or another tenant's", ["reason"], registry=r)
        self.after_delete = Counter("evostream_turns_after_delete_total", "turns dropped because their conversation was deleted after them (seq <= deleted seq)", registry=r)
        self.gap_rebased = Counter("evostream_seq_gaps_rebased_total", "conversations re-based on a later turn after GAP_MAX_DEAD_LETTERS gapped turns were dead-lettered", registry=r)
        self.prefix_cache_events = Counter("evostream_prefix_cache_events_total", "segment-prefix cache (EVOSTREAM_PREFIX_CACHE_MAX_BYTES): hit, miss, stale, store, evict, reject", ["event"], registry=r)
        self.prefix_cache_bytes = Gauge("evostream_prefix_cache_bytes", "bytes held by the segment-prefix cache", registry=r)
        # issue #22: the query-ready memory, and both caches' budgets (part of the worker's memory bound)
        self.query_cache_events = Counter("evostream_query_cache_events_total", "query-ready memory (EVOSTREAM_QUERY_CACHE_MAX_BYTES): hit, miss, store, evict, reject", ["event"], registry=r)
        self.query_cache_bytes = Gauge("evostream_query_cache_bytes", "bytes held by the query-ready memory", registry=r)
        self.compute_info = Gauge("evostream_compute_info", "1, labelled with the compute dtype, the memory dtype and "
                                  "the oneDNN bf16 matmul kernel the probe saw (EVOSTREAM_DTYPE=auto)",
                                  ["dtype", "memory_dtype", "bf16_kernel"], registry=r)
        self.cache_budget_bytes = Gauge("evostream_cache_budget_bytes", "byte budget of each model-side cache (resolved from auto)", ["cache"], registry=r)
        self.queries = Counter("evostream_queries_total", "query embeddings answered", registry=r)
        # broker connectivity (issue #12)
        self.broker_connected = Gauge("evostream_broker_connected", "1 while the broker (metadata + group coordinator) answers this worker's probe, 0 while unreachable", registry=r)
        self.broker_unreachable = Counter("evostream_broker_unreachable_total", "times the broker became unreachable", registry=r)
        # a store that is lost, and late or corrected turns (issue #17)
        self.store_lost = Gauge("evostream_store_lost", "1 while the memory-state store cannot be trusted (emptied, replaced, behind what was acknowledged): the worker holds its batch", registry=r)
        self.store_lost_total = Counter("evostream_store_losses_total", "times this worker found its memory-state store lost", registry=r)
        self.late_turns = Counter("evostream_turns_late_total", "turns dead-lettered late_turn: a seq the conversation had skipped (a gap), arriving after later ones were applied", registry=r)
        self.conflicting_turns = Counter("evostream_turns_conflicting_total", "turns dead-lettered conflicting_duplicate: an applied seq re-sent with other messages", registry=r)
        self.held_turns = Counter("evostream_turns_held_total", "turns dead-lettered behind an earlier quarantined turn of their conversation (replay them in order after the repair)", registry=r)
        self.emit_retries = Counter("evostream_emit_retries_total", "produce rounds retried because the broker did not take every record", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
