"""Per-conversation capacity figures, measured (issue #14): what a live conversation costs.

What it measures, and how:

* Redis bytes per conversation at the released hidden sizes (1024 = 0.8B qwen3_5, 2048 = 2B,
  2560 = 4B qwen3), latents stored in float32 and in bfloat16: a conversation is driven turn
  by turn through the real `MemoryStore` (Lua CAS, deltas, compaction every 32) against
  a real Redis/Valkey started here, with states of the model's shapes (random latents: the
  model's values do not change byte counts). After each turn's commit and outbox ack,
  `MEMORY USAGE <key> SAMPLES 0` of each of the conversation's five keys. Figures at turns
  1..32 (queue filling) and the mean/max over two full compaction cycles once the queue is
  full. A second check compares `INFO used_memory` growth over many conversations with the
  per-key sum.
* Delta bytes per turn and write bytes per turn (payload of the commit script, compactions
  included).
* Redis round trips and commands per batch (load, commit, ack of 64 conversations): round
  trips counted at the client, commands from `INFO commandstats` (Lua's inner calls included).
* Kafka bytes: the EmbeddingEvent JSON the pipeline builds for one turn (1024-d float32
  vector), alone and compressed in a batch of 64 (zstd, lz4: the output_compression choices).
* Levers: bfloat16 storage (bytes, and drift = cosine of each turn's embedding against an
  uninterrupted float32 run, tiny model, multi-segment conversations, reloaded from Redis
  every turn), per-tenant TTL (bytes freed by a short TTL, and the cost: the next turn's
  embedding without memory vs with it), cold tier (Redis bytes moved out, SQLite bytes,
  freeze/thaw time, exactness of the restored conversation's next embeddings).
* Model time per turn on this CPU for the 0.8B shape (qwen3_5, hidden 1024, 24 layers, random
  weights), full queue, one conversation and a small batch (`--model-time`).

Run: `.venv/bin/python -m benchmarks.capacity_measure` (writes benchmarks/results/capacity.json);
then `scripts/capacity_report.py` turns it into docs/CAPACITY.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import statistics
import sys
import tempfile
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import redis
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from schemas.events import EmbeddingEvent, MemoryOrigin, SourceRef, StageTimings  # noqa: E402
from schemas.turns import ChatMessage, TurnInput  # noqa: E402
from schemas.vectors import encode_vector  # noqa: E402
from stream.state.records import TurnCommit
from stream.state.store import MemoryStore
from stream.state.cold_tier import ColdTier  # noqa: E402
from stream.identity import ConversationRef  # noqa: E402
from devtools.localstack import RedisServer  # noqa: E402
from workers.state import ConversationState, StateDelta  # noqa: E402

SHAPES = [  # (label, family, hidden) of the released checkpoints (MODEL_SPEC.md)
    ("0.8B", "qwen3_5", 1024),
    ("2B", "qwen3_5", 2048),
    ("4B", "qwen3", 2560),
]
L, C, SEG_TURNS, COMPACT = 16, 512, 16, 32
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------
# Redis bytes per conversation


class SimConversation:
    """Drives a conversation like the engine does (16 latents per turn, segments of 16 turns,
    `turn_tokens` memory tokens per turn), with random latents of the model's shape."""

    def __init__(self, store: MemoryStore, ref: ConversationRef, turn_tokens: int, seed: int) -> None:
        self.store, self.ref, self.turn_tokens = store, ref, turn_tokens
        self.gen = torch.Generator().manual_seed(seed)
        self.state: ConversationState | None = None
        self.g = 1
        self.fresh = True

    async def start(self) -> None:
        if not getattr(self.store, "_cap_prepared", False):  # scripts loaded once (no NOSCRIPT retry)
            await self.store.prepare()
            self.store._cap_prepared = True  # type: ignore[attr-defined]
        loaded = (await self.store.load_many([self.ref]))[self.ref]
        self.state, self.g, self.fresh = loaded.state, loaded.gen, not loaded.live

    async def turn(self, event_bytes: bytes, ack: bool = True) -> int:
        st = self.state
        assert st is not None
        start = st.seq
        d = StateDelta(seq=st.seq + 1, new_segment=st.seq < 0 or len(st.segment_token_ids) >= SEG_TURNS,
                       token_ids=list(range(self.turn_tokens)),
                       latents=torch.randn(L, st.hidden_size, generator=self.gen))
        st.apply(d)
        res = (await self.store.commit([TurnCommit(self.ref, start, st, [d], {d.seq: event_bytes},
                                                   expected_gen=self.g, fresh=self.fresh)]))[0]
        assert res.applied, res
        self.fresh = False
        if ack:
            await self.store.ack_emitted({self.ref: [d.seq]})
        return res.bytes_written


def key_usage(r: redis.Redis, store: MemoryStore, ref: ConversationRef) -> dict[str, int]:
    k = store.keys(ref)
    return {name: int(r.memory_usage(key, samples=0) or 0) for name, key in k._asdict().items()}


async def measure_redis_shape(url: str, r: redis.Redis, hidden: int, storage: str, turn_tokens: int,
                              event_bytes: bytes, warm: int, cycles: int, many: int,
                              compact_every: int = COMPACT) -> dict[str, Any]:
    ns = f"cap-{uuid.uuid4().hex[:6]}"
    store = MemoryStore(url, fingerprint="capacity", hidden_size=hidden, capacity=C, dtype=torch.float32,
                            namespace=ns, compact_every=compact_every, ttl_s=7 * 24 * 3600,
                            storage_dtype=DTYPES[storage] if storage != "float32" else None)
    try:
        conv = SimConversation(store, ConversationRef("acme", "cap-0"), turn_tokens, seed=hidden)
        await conv.start()
        by_turn: dict[int, int] = {}
        per_key_series: list[dict[str, int]] = []
        writes: list[int] = []
        pending_outbox = 0
        total_turns = warm + cycles * max(COMPACT, compact_every)
        for t in range(1, total_turns + 1):
            written = await conv.turn(event_bytes, ack=True)
            if t in (1, 2, 4, 8, 16, 24, 32, 33, 48, 64):
                by_turn[t] = sum(key_usage(r, store, conv.ref).values())
            if t > warm:
                per_key_series.append(key_usage(r, store, conv.ref))
                writes.append(written)
        # one more turn without the ack: the outbox holds the event until the broker confirms
        before = key_usage(r, store, conv.ref)["outbox"]
        await conv.turn(event_bytes, ack=False)
        pending_outbox = key_usage(r, store, conv.ref)["outbox"] - before
        totals = [sum(s.values()) for s in per_key_series]
        delta_payload = len(store.codec.delta_bytes(StateDelta(
            seq=1, new_segment=False, token_ids=list(range(turn_tokens)),
            latents=torch.zeros(L, hidden), prev_seq=0)))
        full_state = len(store.codec.state_bytes(conv.state))  # type: ignore[arg-type]
        # used_memory growth over `many` conversations at the steady point (allocator overhead)
        used0 = int(r.info("memory")["used_memory"])
        sums = 0
        for i in range(many):
            c = SimConversation(store, ConversationRef("acme", f"many-{i}"), turn_tokens, seed=i)
            await c.start()
            for _ in range(warm):
                await c.turn(event_bytes, ack=True)
            sums += sum(key_usage(r, store, c.ref).values())
        used1 = int(r.info("memory")["used_memory"])
        return {
            "hidden": hidden, "storage_dtype": storage, "turn_tokens": turn_tokens, "compact_every": compact_every,
            "bytes_by_turn": by_turn,
            "steady_turns": f"{warm + 1}..{total_turns}",
            "steady_mean": statistics.fmean(totals), "steady_max": max(totals), "steady_min": min(totals),
            "steady_per_key_mean": {k: statistics.fmean(s[k] for s in per_key_series) for k in per_key_series[0]},
            "outbox_bytes_per_pending_event": pending_outbox,
            "delta_payload_bytes": delta_payload,
            "full_state_payload_bytes": full_state,
            "write_bytes_per_turn_mean": statistics.fmean(writes),
            "write_bytes_per_turn_max": max(writes),
            "used_memory_check": {"conversations": many, "at_turn": warm, "used_memory_growth": used1 - used0,
                                  "memory_usage_sum": sums,
                                  "ratio": (used1 - used0) / sums if sums else None},
        }
    finally:
        await store.close()


# ---------------------------------------------------------------------------------------------
# Round trips and commands per batch


class _CountingPipelines:
    """Counts pipeline executions (= round trips) of a store's client."""

    def __init__(self, store: MemoryStore) -> None:
        self.n = 0
        real = store.redis.pipeline

        def pipeline(*a: Any, **kw: Any) -> Any:
            p = real(*a, **kw)
            orig = p.execute

            async def execute(*ea: Any, **ekw: Any) -> Any:
                self.n += 1
                return await orig(*ea, **ekw)

            p.execute = execute
            return p

        store.redis.pipeline = pipeline  # type: ignore[method-assign]


def _cmdstats(r: redis.Redis) -> dict[str, int]:
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in r.info("commandstats").items()}


def _evalsha_usec(r: redis.Redis) -> int:
    return int(r.info("commandstats").get("cmdstat_evalsha", {}).get("usec", 0))


async def measure_ops(url: str, r: redis.Redis, batch: int, event_bytes: bytes) -> dict[str, Any]:
    hidden = 1024
    ns = f"ops-{uuid.uuid4().hex[:6]}"
    store = MemoryStore(url, fingerprint="capacity", hidden_size=hidden, capacity=C, dtype=torch.float32,
                            namespace=ns, compact_every=COMPACT)
    await store.prepare()
    refs = [ConversationRef("acme", f"ops-{i}") for i in range(batch)]
    convs = [SimConversation(store, ref, 64, seed=i) for i, ref in enumerate(refs)]
    for c in convs:
        await c.start()
        for _ in range(3):
            await c.turn(event_bytes)
    counter = _CountingPipelines(store)
    out: dict[str, Any] = {"batch_conversations": batch, "turns_per_conversation": 1}
    gen = torch.Generator().manual_seed(0)

    async def phase(name: str, coro_fn: Any) -> Any:
        n0, s0, u0 = counter.n, _cmdstats(r), _evalsha_usec(r)
        res = await coro_fn()
        u1 = _evalsha_usec(r)
        s1 = _cmdstats(r)
        diff = {k: s1.get(k, 0) - s0.get(k, 0) for k in s1 if s1.get(k, 0) != s0.get(k, 0)}
        diff.pop("info", None)  # our own INFO calls
        diff = {k: v for k, v in diff.items() if v}
        out[name] = {"round_trips": counter.n - n0, "commands": sum(diff.values()), "by_command": diff,
                     "script_server_usec_per_conversation": (u1 - u0) / batch}
        return res

    loaded = await phase("load (state cache miss)", lambda: store.load_many(refs))
    commits = []
    for ref in refs:
        lc = loaded[ref]
        st = lc.state
        d = StateDelta(seq=st.seq + 1, new_segment=False, token_ids=list(range(64)),
                       latents=torch.randn(L, hidden, generator=gen))
        st.apply(d)
        commits.append(TurnCommit(ref, lc.seq, st, [d], {d.seq: event_bytes}, expected_gen=lc.gen))
    await phase("commit (append deltas + outbox)", lambda: store.commit(commits))
    await phase("ack outbox", lambda: store.ack_emitted({ref: [c.state.seq] for ref, c in zip(refs, commits)}))
    await store.close()
    return out


# ---------------------------------------------------------------------------------------------
# Kafka bytes


def embedding_event(dim: int = 1024, cid: str = "support-refund-0001", fingerprint: str = "0" * 16,
                    model: str = "Qwen/Qwen3.5-0.8B", seed: int = 0) -> bytes:
    """The EmbeddingEvent the pipeline builds for one turn (stream/processing/pipeline.py _embedding_bytes)."""
    v = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    v /= np.linalg.norm(v)
    ev = EmbeddingEvent(
        conversation_id=cid, seq=1234, vector=encode_vector(v), dim=dim, model=model, checkpoint=fingerprint,
        memory_len=512, memory=MemoryOrigin.CONTINUED, generation=1, tenant="acme",
        source=SourceRef(topic="evostream.turns", partition=7, offset=123456789),
        timings=StageTimings(queue_ms=12.5, step_ms=80.25, checkpoint_ms=1.5),
        produced_at=datetime.now(timezone.utc))
    return ev.model_dump_json().encode()


def measure_kafka(fingerprint: str) -> dict[str, Any]:
    import cramjam

    events = [embedding_event(fingerprint=fingerprint, seed=i) for i in range(64)]
    batch = b"".join(events)
    turns = []
    for line in (REPO / "data" / "sample_conversations.jsonl").read_text().splitlines():
        conv = json.loads(line)
        for i, t in enumerate(conv["turns"]):
            msgs = [{"role": "user", "content": t.get("user", "")}, {"role": "assistant", "content": t.get("assistant", "")}]
            turns.append(len(json.dumps({"type": "turn", "conversation_id": conv["conversation_id"], "seq": i,
                                         "messages": msgs, "timestamp": "2026-11-24T12:00:00Z",
                                         "tenant": conv.get("tenant")}).encode()))
    return {
        "embedding_event_bytes": statistics.fmean(len(e) for e in events),
        "embedding_event_key_bytes": len(b"support-refund-0001"),
        "embedding_batch64_zstd_bytes_per_event": len(bytes(cramjam.zstd.compress(batch))) / 64,
        "embedding_batch64_lz4_bytes_per_event": len(bytes(cramjam.lz4.compress_block(batch))) / 64,
        "turn_event_bytes_mean_sample": statistics.fmean(turns),
        "turn_events_in_sample": len(turns),
        "note": "record payload only; Kafka adds ~70 B of record/batch framing per record and replication",
    }


# ---------------------------------------------------------------------------------------------
# Levers on the tiny model (drift), through the real store


def _synthetic_turns(cid: str, n: int) -> list[TurnInput]:
    rng = random.Random(cid)
    words = ("refund order parcel card week size blue jacket shop exchange visa days address courier "
             "invoice warranty battery screen replace account password login billing plan").split()
    return [TurnInput(conversation_id=cid, seq=i, messages=[
        ChatMessage(role="user", content=" ".join(rng.choice(words) for _ in range(rng.randint(5, 25)))),
        ChatMessage(role="assistant", content=" ".join(rng.choice(words) for _ in range(rng.randint(5, 40))))])
        for i in range(n)]


async def _run_conversation(engine: Any, url: str, turns: list[TurnInput], *, storage: torch.dtype | None,
                            reload_every: int, ns: str, cold: ColdTier | None = None,
                            freeze_at: int | None = None) -> tuple[list[np.ndarray], dict[str, Any]]:
    store = MemoryStore(url, fingerprint=engine.fingerprint, hidden_size=engine.hidden_size,
                            capacity=engine.capacity, dtype=engine.state_dtype, namespace=ns,
                            storage_dtype=storage, cold=cold)
    ref = ConversationRef("acme", turns[0].conversation_id)
    embs, info = [], {}
    try:
        loaded = (await store.load_many([ref]))[ref]
        state, gen, fresh = loaded.state, loaded.gen, True
        for i, t in enumerate(turns):
            start = state.seq
            out = engine.step({ref.tag: state}, [t.model_copy(update={"conversation_id": ref.tag})])
            embs.append(out[0].embedding.copy())
            res = await store.commit([TurnCommit(ref, start, state.copy(), [out[0].delta], {},
                                                 expected_gen=gen, fresh=fresh)])
            assert res[0].applied
            fresh = False
            if cold is not None and freeze_at == i:
                t0 = time.perf_counter()
                rep = await cold.freeze(store, [ref])
                info["freeze_s"] = time.perf_counter() - t0
                info["frozen"] = rep.frozen
                info["bytes_moved"] = rep.bytes_moved
                t0 = time.perf_counter()
                again = await store.load(ref)  # thaws
                info["thaw_load_s"] = time.perf_counter() - t0
                assert again is not None
                info["restored_equal"] = bool(again.state.equals(state))
                state = again.state
            elif (i + 1) % reload_every == 0:
                again = await store.load(ref)
                assert again is not None
                state = again.state
    finally:
        await store.close()
    return embs, info


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def measure_levers(url: str, r: redis.Redis, n_convs: int, n_turns: int, tmpdir: Path) -> dict[str, Any]:
    from workers.engine import load_engine
    from workers.tiny_checkpoint import cached_tiny_checkpoint

    torch.set_num_threads(1)  # 2 shared cores: one thread is the fastest and steadiest here
    engine = load_engine(cached_tiny_checkpoint("qwen3_5", "tiny"))
    out: dict[str, Any] = {"model": f"tiny qwen3_5 (hidden {engine.hidden_size}), float32 compute",
                           "conversations": n_convs, "turns": n_turns}
    # bfloat16 storage: drift vs uninterrupted float32
    cos_all: list[float] = []
    cos_last: list[float] = []
    bit_equal_reload = True
    for k in range(n_convs):
        turns = _synthetic_turns(f"drift-{k}", n_turns)
        base, _ = asyncio.run(_run_conversation(engine, url, turns, storage=None, reload_every=10 ** 9,
                                                ns=f"lv-{uuid.uuid4().hex[:6]}"))
        b16, _ = asyncio.run(_run_conversation(engine, url, turns, storage=torch.bfloat16, reload_every=1,
                                               ns=f"lv-{uuid.uuid4().hex[:6]}"))
        if k == 0:  # one conversation suffices for the bitwise check
            b16s, _ = asyncio.run(_run_conversation(engine, url, turns, storage=torch.bfloat16,
                                                    reload_every=10 ** 9, ns=f"lv-{uuid.uuid4().hex[:6]}"))
            bit_equal_reload &= all(np.array_equal(a, b) for a, b in zip(b16, b16s))
        cs = [_cos(a, b) for a, b in zip(base, b16)]
        cos_all += cs
        cos_last.append(cs[-1])
    out["bfloat16_storage"] = {
        "cosine_vs_float32_min": min(cos_all), "cosine_vs_float32_mean": statistics.fmean(cos_all),
        "cosine_vs_float32_last_turn_mean": statistics.fmean(cos_last),
        "reload_every_turn_equals_no_reload_bitwise": bit_equal_reload,
    }
    # cold tier: exact (next embeddings after a freeze/thaw vs uninterrupted)
    cold = ColdTier(tmpdir / "cold.sqlite")
    turns = _synthetic_turns("cold-0", n_turns)
    base, _ = asyncio.run(_run_conversation(engine, url, turns, storage=None, reload_every=10 ** 9,
                                            ns=f"lv-{uuid.uuid4().hex[:6]}"))
    thawed, info = asyncio.run(_run_conversation(engine, url, turns, storage=None, reload_every=10 ** 9,
                                                 ns=f"lv-{uuid.uuid4().hex[:6]}", cold=cold, freeze_at=n_turns // 2))
    out["cold_tier_exactness"] = {
        **info, "frozen_at_turn": n_turns // 2,
        "embeddings_after_thaw_bitwise_equal": all(np.array_equal(a, b) for a, b in zip(base, thawed)),
    }
    cold.close()
    # TTL: what an expired memory costs the next turn (embedding without memory vs with it)
    with_mem = base[n_turns // 2 + 1]
    fresh_state = engine.new_state()
    t = turns[n_turns // 2 + 1].model_copy(update={"conversation_id": "x", "seq": 0})
    no_mem = engine.step({"x": fresh_state}, [t])[0].embedding
    out["ttl_expiry_next_turn_cosine_without_vs_with_memory"] = _cos(with_mem, no_mem)
    return out


async def measure_store_levers(url: str, r: redis.Redis, hidden: int, n: int, turns: int, tmpdir: Path,
                               event_bytes: bytes) -> dict[str, Any]:
    """Bytes freed by a short per-tenant TTL and by the cold tier, n conversations of `turns`
    turns at the given hidden size (float32 storage)."""
    out: dict[str, Any] = {"hidden": hidden, "conversations": n, "turns_each": turns}
    # per-tenant TTL: both tenants seeded under the default TTL; then the policy gives tenant
    # 'brief' a 1 s TTL, which its next turn applies (a commit refreshes the TTL of every key).
    ns = f"ttl-{uuid.uuid4().hex[:6]}"
    store = MemoryStore(url, fingerprint="capacity", hidden_size=hidden, capacity=C, dtype=torch.float32,
                            namespace=ns, ttl_s=3600)
    convs = {}
    for tenant in ("brief", "keep"):
        for i in range(n):
            c = SimConversation(store, ConversationRef(tenant, f"t-{i}"), 64, seed=i)
            await c.start()
            for _ in range(turns):
                await c.turn(event_bytes)
            convs[c.ref] = c
    await store.close()
    policy = MemoryStore(url, fingerprint="capacity", hidden_size=hidden, capacity=C, dtype=torch.float32,
                             namespace=ns, ttl_s=3600, ttl_by_tenant={"brief": 1})
    held = 0
    for ref, c in convs.items():
        if ref.tenant == "brief":
            c.store = policy
            await c.start()
            await c.turn(event_bytes)
            held += sum(key_usage(r, policy, ref).values())
    used1 = int(r.info("memory")["used_memory"])
    brief = [ref for ref in convs if ref.tenant == "brief"]
    deadline = time.time() + 60
    while time.time() < deadline:  # expiry is lazy + active: wait until every brief meta is gone
        await asyncio.sleep(0.5)
        if sum(r.exists(policy.keys(ref).meta) for ref in brief) == 0:
            break
    await asyncio.sleep(0.5)
    used2 = int(r.info("memory")["used_memory"])
    got = await policy.load_many(brief + [ref for ref in convs if ref.tenant == "keep"][:3])
    out["ttl"] = {"brief_tenant_memory_usage_before_expiry": held,
                  "used_memory_freed_when_brief_tenant_expired": used1 - used2,
                  "freed_per_expired_conversation": (used1 - used2) / n,
                  "brief_after_expiry_origin": sorted({v.origin.value for k, v in got.items() if k.tenant == "brief"}),
                  "keep_still_live": all(v.live for k, v in got.items() if k.tenant == "keep"),
                  "marker_bytes_left_per_expired_conversation": statistics.fmean(
                      key_usage(r, policy, ref)["mark"] for ref in brief),
                  "note": "the marker stays for marker_ttl_s so that expiry is told apart from a gap"}
    await policy.close()
    # cold tier: freeze all of a namespace
    ns = f"cold-{uuid.uuid4().hex[:6]}"
    cold = ColdTier(tmpdir / f"{ns}.sqlite")
    store = MemoryStore(url, fingerprint="capacity", hidden_size=hidden, capacity=C, dtype=torch.float32,
                            namespace=ns, cold=cold)
    refs = [ConversationRef("acme", f"c-{i}") for i in range(n)]
    for i, ref in enumerate(refs):
        c = SimConversation(store, ref, 64, seed=i)
        await c.start()
        for _ in range(turns):
            await c.turn(event_bytes)
    in_redis = sum(sum(key_usage(r, store, ref).values()) for ref in refs)
    used1 = int(r.info("memory")["used_memory"])
    t0 = time.perf_counter()
    rep = await cold.freeze_idle(store, idle_s=0)
    freeze_s = time.perf_counter() - t0
    used2 = int(r.info("memory")["used_memory"])
    cold.checkpoint_wal()
    sqlite_bytes = cold.file_bytes()
    left = sum(sum(key_usage(r, store, ref).values()) for ref in refs)
    t0 = time.perf_counter()
    await store.load_many(refs)
    thaw_s = time.perf_counter() - t0
    out["cold_tier"] = {"note": "float32 storage; sqlite file after a WAL checkpoint",
        "frozen": rep.frozen, "memory_usage_before": in_redis, "memory_usage_after_freeze": left,
        "used_memory_freed": used1 - used2, "sqlite_file_bytes": sqlite_bytes,
        "payload_bytes_moved": rep.bytes_moved,
        "freeze_ms_per_conversation": freeze_s * 1000 / max(1, rep.frozen),
        "thaw_ms_per_conversation": thaw_s * 1000 / n,
        "marker_bytes_left_per_conversation": left / n,
    }
    await store.close()
    cold.close()
    return out


# ---------------------------------------------------------------------------------------------
# Model time, 0.8B shape on this CPU


def measure_model_time(threads: int, batch: int, reps: int) -> dict[str, Any]:
    from workers.engine import EvoEngine
    from workers.tiny_checkpoint import build_tiny_model
    from workers.tokenizer import load_qwen_tokenizer

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    model = build_tiny_model("qwen3_5", "bench1024", lora_r=64, lora_alpha=128)
    model.eval()
    build_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())
    engine = EvoEngine(model, load_qwen_tokenizer("qwen3_5"), fingerprint="bench1024")
    gen = torch.Generator().manual_seed(0)

    def full_state() -> ConversationState:
        st = engine.new_state()
        st.latents = 0.02 * torch.randn(C, engine.hidden_size, generator=gen)
        st.snapshot_len = C
        st.seq = 100
        st.segment_token_ids = [[1] * 60 for _ in range(SEG_TURNS)]  # full segment: next turn opens one
        return st

    turns = _synthetic_turns("speed", batch + 1)
    res: dict[str, Any] = {"shape": "qwen3_5 bench1024: hidden 1024, 24 layers, mlp 3072, LoRA r=64",
                           "params": n_params, "torch_threads": threads, "build_s": build_s,
                           "device": "cpu", "dtype": "float32"}
    with torch.inference_mode():
        one = []
        for k in range(reps):
            st = full_state()
            t = turns[0].model_copy(update={"conversation_id": "one", "seq": 101})
            t0 = time.perf_counter()
            engine.step({"one": st}, [t])
            one.append(time.perf_counter() - t0)
            log(f"  0.8B shape, one turn (full queue): {one[-1]:.2f} s; positions {engine.last_stats.real_tokens}")
        res["one_turn_s"] = one
        res["one_turn_positions"] = engine.last_stats.real_tokens
        states = {f"b{i}": full_state() for i in range(batch)}
        bt = [turns[i + 1].model_copy(update={"conversation_id": f"b{i}", "seq": 101}) for i in range(batch)]
        t0 = time.perf_counter()
        engine.step(states, bt)
        res["batch"] = batch
        res["batch_s"] = time.perf_counter() - t0
        res["batch_positions"] = engine.last_stats.real_tokens
        log(f"  0.8B shape, batch of {batch}: {res['batch_s']:.2f} s")
    res["turns_per_s_one"] = 1 / statistics.median(one)
    res["turns_per_s_batch"] = batch / res["batch_s"]
    return res


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "capacity.json")
    ap.add_argument("--turn-tokens", type=int, default=80, help="memory-rendering tokens per turn (stored ids)")
    ap.add_argument("--warm", type=int, default=64, help="turns before the steady-state window")
    ap.add_argument("--cycles", type=int, default=2, help="compaction cycles (32 turns) measured")
    ap.add_argument("--many", type=int, default=20, help="conversations for the used_memory cross-check")
    ap.add_argument("--batch", type=int, default=64, help="conversations per batch for the round-trip count")
    ap.add_argument("--drift-convs", type=int, default=3)
    ap.add_argument("--drift-turns", type=int, default=48, help="3 segments; the queue is full from turn 32")
    ap.add_argument("--lever-convs", type=int, default=50)
    ap.add_argument("--model-time", action="store_true", help="also time the 0.8B shape on this CPU (minutes)")
    ap.add_argument("--model-time-only", action="store_true", help="only the model time (keeps the rest of --out)")
    ap.add_argument("--model-threads", type=int, default=2)
    ap.add_argument("--model-batch", type=int, default=4)
    ap.add_argument("--model-reps", type=int, default=2)
    ap.add_argument("--shapes", default="0.8B,2B,4B")
    ap.add_argument("--compact-sweep", default="4,8,16,32",
                    help="compact_every values measured for the 0.8B shape in bfloat16 (memory vs write bytes)")
    ap.add_argument("--compact-sweep-only", action="store_true",
                    help="only the compact_every sweep (keeps the rest of --out)")
    args = ap.parse_args(argv)

    t_start = time.time()
    cmd = "python -m benchmarks.capacity_measure " + " ".join(argv if argv is not None else sys.argv[1:])
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    result: dict[str, Any] = {"meta": {
        "machine": f"{platform.platform()}, {__import__('os').cpu_count()} CPUs (shared with other work)",
        "python": platform.python_version(), "torch": torch.__version__,
        "gpu": "none: no CUDA device on this machine and no device machine lent to this task",
        "num_latents": L, "buffer_capacity": C, "segment_turns": SEG_TURNS, "compact_every": COMPACT,
    }}
    suffix = "_model_time" if args.model_time_only else "_compact_sweep" if args.compact_sweep_only else ""
    result["meta"]["loadavg_1m_at_start" + suffix] = __import__("os").getloadavg()[0]
    if args.compact_sweep_only:
        result["meta"].update(command_compact_sweep=cmd, date_compact_sweep=date)
        with tempfile.TemporaryDirectory(prefix="capacity-") as tmp:
            server = RedisServer(Path(tmp), appendonly=False, die_with_parent=True)
            server.start()
            try:
                r = redis.Redis.from_url(server.url)
                result["compact_sweep"] = measure_compact_sweep(args, server.url, r)
                r.close()
            finally:
                server.stop()
    elif args.model_time_only:
        result["meta"].update(command_model_time=cmd, date_model_time=date)
        result["model_time"] = {"cpu_0.8B": measure_model_time(args.model_threads, args.model_batch, args.model_reps)}
    else:
        result["meta"].update(command=cmd, date_utc=date)
        with tempfile.TemporaryDirectory(prefix="capacity-") as tmp:
            server = RedisServer(Path(tmp), appendonly=False, die_with_parent=True)
            server.start()
            try:
                r = redis.Redis.from_url(server.url)
                measure_redis_all(args, result, server.url, r, Path(tmp))
                r.close()
            finally:
                server.stop()
        if args.model_time:
            result["meta"].update(command_model_time=cmd, date_model_time=date)
            result["model_time"] = {"cpu_0.8B": measure_model_time(args.model_threads, args.model_batch, args.model_reps)}
    result["meta"]["wall_s" + suffix] = time.time() - t_start
    result["meta"]["loadavg_1m_at_end" + suffix] = __import__("os").getloadavg()[0]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.out.exists():  # keep what this run did not measure (e.g. --model-time-only)
        old = json.loads(args.out.read_text())
        for k, v in old.items():
            if k == "meta":
                for mk, mv in v.items():
                    result["meta"].setdefault(mk, mv)
            else:
                result.setdefault(k, v)
    args.out.write_text(json.dumps(result, indent=1, default=str) + "\n")
    log(f"wrote {args.out} in {result['meta']['wall_s' + suffix]:.0f} s")


def measure_compact_sweep(args: argparse.Namespace, url: str, r: redis.Redis) -> list[dict[str, Any]]:
    out = []
    for ce in (int(x) for x in args.compact_sweep.split(",") if x):
        log(f"compact_every sweep: {ce} (0.8B, bfloat16)")
        m = asyncio.run(measure_redis_shape(url, r, 1024, "bfloat16", args.turn_tokens, embedding_event(),
                                            args.warm, args.cycles, 2, compact_every=ce))
        out.append({k: m[k] for k in ("compact_every", "steady_mean", "steady_max", "write_bytes_per_turn_mean",
                                       "steady_per_key_mean")})
        r.flushall()
    return out


def measure_redis_all(args: argparse.Namespace, result: dict[str, Any], url: str, r: redis.Redis, tmp: Path) -> None:
    from workers.loading import checkpoint_fingerprint
    from workers.tiny_checkpoint import cached_tiny_checkpoint

    info = r.info("server")
    result["meta"]["redis"] = f"{info.get('server_name', 'redis')} {info.get('valkey_version', info.get('redis_version'))}"
    result["meta"]["allocator"] = r.info("memory").get("mem_allocator")
    ev = embedding_event()
    log("Kafka bytes")
    result["kafka"] = measure_kafka(checkpoint_fingerprint(cached_tiny_checkpoint("qwen3_5", "tiny")))
    wanted = set(args.shapes.split(","))
    result["redis"] = []
    for label, family, hidden in SHAPES:
        if label not in wanted:
            continue
        for storage in ("float32", "bfloat16"):
            log(f"Redis bytes: {label} hidden {hidden}, {storage}")
            m = asyncio.run(measure_redis_shape(url, r, hidden, storage, args.turn_tokens, ev,
                                                args.warm, args.cycles, args.many))
            m.update(size=label, family=family)
            result["redis"].append(m)
            r.flushall()
    log("round trips per batch")
    result["redis_ops"] = asyncio.run(measure_ops(url, r, args.batch, ev))
    r.flushall()
    log("levers on the tiny model (drift)")
    result["levers"] = measure_levers(url, r, args.drift_convs, args.drift_turns, tmp)
    r.flushall()
    log("levers: TTL and cold tier bytes (hidden 1024)")
    result["levers"]["store"] = asyncio.run(measure_store_levers(url, r, 1024, args.lever_convs, 40, tmp, ev))


if __name__ == "__main__":
    main()
