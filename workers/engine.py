"""The engine: many conversations' turns in, embeddings and advanced memories out.

It owns the model and the device (the "worker" of vLLM's split), asks the scheduler what runs
together and the runner how. Per turn it does what MODEL_SPEC calls memory evolution and
representation generation, incrementally:

- the turn's *embedding* is computed against the queue as it stood before the turn;
- the turn's *memory latents* are computed over the open segment (snapshot + the segment's
  earlier turns, each followed by the query slots, + this turn + query slots). By causality
  that equals the reference's one-pass-per-segment numbers, at a cost bounded by the segment
  size instead of the conversation length.
- with `prefix_cache_max_bytes` > 0, what the backbone computed for the segment so far is kept per
  conversation (workers/prefix_pass.py, workers/prefix_cache.py), so the memory step computes only
  the new turn and its query slots; a missing or stale entry means recomputing from the snapshot.
- with `query_cache_max_bytes` > 0, the retriever's work over each conversation's new queue is
  computed once after its turn is applied and kept (workers/query_cache.py), so queries until the
  next turn, and that turn's own embedding, compute only their own tokens; a miss computes the
  queue too, as without the cache.

Both caches change how much is computed; the numbers agree within float rounding, not bit for
bit (attention summed over a cached prefix plus the new tokens adds in another order than one
pass over all of them: about 2e-6 on the tiny checkpoint; tests/test_prefix_cache.py,
tests/test_query_cache.py bound it). Both are off unless configured (the worker turns them on
from its settings, stream/cli/core.py), so an `EvoEngine` built in code is the plain path the
parity tests pin, and `evostream rebuild` (exact mode) turns them off to equal an offline
replay bit for bit.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from schemas.turns import TurnInput
from workers.evo_model import EvoEmbeddingModel
from workers.loading import LoadedModel, load_checkpoint
from workers.precision import ProbeResult, choose_compute_dtype
from workers.prefix_cache import CacheEvent, PrefixCache
from workers.prefix_pass import PrefixPass, PrefixState
from workers.query_cache import QueryCache
from workers.rendering import MemoryRendering, Renderer
from workers.runner import ModelRunner, Row
from workers.scheduler import Budget, SegmentRule, pack, plan_waves
from workers.state import ConversationState, StateDelta
from workers.tokenizer import QwenTokenizer


@dataclass
class TurnOutput:
    conversation_id: str
    seq: int
    embedding: np.ndarray | None     # float32 [E], L2-normalised (None when embed=False)
    delta: StateDelta
    memory_len: int                  # latents in the queue the embedding saw
    new_segment: bool


@dataclass
class StepStats:
    """What the last step did, for metrics and benchmarks."""

    turns: int = 0
    waves: int = 0
    passes: int = 0
    padded_tokens: int = 0
    real_tokens: int = 0
    seconds: float = 0.0
    per_pass: list[tuple[str, int, int]] = field(default_factory=list)  # (adapter, rows, padded len)
    reused_positions: int = 0     # memory-row positions taken from the prefix cache instead of computed
    prefix_hits: int = 0          # memory rows continued from a cached prefix
    prefix_misses: int = 0        # rows of an open segment that had to recompute it (restart, eviction, stale)
    ready_positions: int = 0      # retriever positions computed to make new queues query-ready
    query_reused_positions: int = 0  # retriever positions taken from the query-ready memory


@dataclass
class QueryStats:
    """What the last `embed_queries` / `embed_texts` call computed (benchmarks: positions per query)."""

    texts: int = 0
    own_tokens: int = 0           # the texts' own token ids (instruction included for queries)
    positions: int = 0            # positions the model computed (own tokens + queue positions not cached)
    reused_positions: int = 0     # queue positions read from the query-ready memory
    hits: int = 0


@dataclass(frozen=True)
class EngineConfig:
    budget: Budget = Budget()
    segment: SegmentRule = SegmentRule()
    memory_rendering: MemoryRendering = MemoryRendering.CHATML
    padding: str = "right"   # "left" = the reference's masked layout (see runner.py)
    # bytes of segment prefixes kept for the next turn (prefix_pass.py / prefix_cache.py); 0 = off,
    # every memory step re-reads its open segment (the uncached path the parity tests pin)
    prefix_cache_max_bytes: int = 0
    # bytes of query-ready memories (query_cache.py); 0 = off: queries re-read the queue
    query_cache_max_bytes: int = 0
    # dtype of the conversations' memory when it differs from the compute dtype (workers/precision.py:
    # EVOSTREAM_DTYPE=auto computes in what the host runs fastest, and keeps float32 memory); None = the model's
    state_dtype: torch.dtype | None = None


class EvoEngine:
    def __init__(self, model: EvoEmbeddingModel, tokenizer: QwenTokenizer, *, fingerprint: str = "unknown",
                 model_name: str = "", config: EngineConfig = EngineConfig()):
        self.model = model
        self.tokenizer = tokenizer
        self.fingerprint = fingerprint
        self.model_name = model_name or model.config.base_model_name_or_path
        self.config = config
        self.renderer = Renderer(tokenizer, config.memory_rendering)
        self.runner = ModelRunner(model, config.padding)
        self.L = model.config.num_latents
        self.capacity = model.config.buffer_capacity
        self.hidden_size = model.config.hidden_size
        self.embedding_dim = model.config.embedding_dim
        self.last_stats = StepStats()
        self.prefix_pass = PrefixPass(model)
        self.prefix_cache: PrefixCache | None = (
            PrefixCache(config.prefix_cache_max_bytes) if config.prefix_cache_max_bytes > 0 else None)
        self.query_cache: QueryCache | None = (
            QueryCache(config.query_cache_max_bytes) if config.query_cache_max_bytes > 0 else None)
        self.last_query_stats = QueryStats()
        self.precision: ProbeResult | None = None  # set by load_engine(dtype="auto")

    def set_prefix_cache_hook(self, hook: CacheEvent | None) -> None:
        """Metric hook of the prefix cache (see prefix_cache.CacheEvent); no-op when it is off."""
        if self.prefix_cache is not None:
            self.prefix_cache.on_event = hook

    def set_query_cache_hook(self, hook: CacheEvent | None) -> None:
        """Metric hook of the query-ready memory (same events as the prefix cache)."""
        if self.query_cache is not None:
            self.query_cache.on_event = hook

    def drop_conversation_caches(self) -> None:
        """Forget every conversation's cached work (a rebalance took partitions away: their
        memory is another worker's now). Call on the model thread. Only costs recomputation."""
        for cache in (self.prefix_cache, self.query_cache):
            if cache is not None:
                cache.clear()

    @contextmanager
    def scratch(self) -> Iterator[None]:
        """Steps on throw-away memories (a rerank's candidates) without touching the caches or
        the last step's statistics. Call on the model thread."""
        caches, stats = (self.prefix_cache, self.query_cache), self.last_stats
        self.prefix_cache = self.query_cache = None
        try:
            yield
        finally:
            self.prefix_cache, self.query_cache = caches
            self.last_stats = stats

    # -- state -------------------------------------------------------------------------------
    @property
    def state_dtype(self) -> torch.dtype:
        return self.config.state_dtype or self.model.dtype

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.model.dtype

    def new_state(self) -> ConversationState:
        return ConversationState(hidden_size=self.hidden_size, capacity=self.capacity, dtype=self.state_dtype)

    def turn_tokens(self, turn: TurnInput) -> int:
        """Length of the turn's longest rendering (what an oversized-turn limit should see)."""
        return max(len(self.renderer.memory_ids(turn)), len(self.renderer.embedding_ids(turn)))

    # -- the step --------------------------------------------------------------------------
    def step(self, states: dict[str, ConversationState], turns: Sequence[TurnInput], *,
             embed: bool = True) -> list[TurnOutput]:
        """Apply `turns` to `states` in place (see module docstring); outputs in input order.
        The caller decides which turns are due (seq checks happen upstream)."""
        t0 = time.perf_counter()
        stats = StepStats(turns=len(turns))
        mem_ids = [self.renderer.memory_ids(t) for t in turns]
        emb_ids = [self.renderer.embedding_ids(t) for t in turns] if embed else []
        outputs: list[TurnOutput | None] = [None] * len(turns)
        for cid in {t.conversation_id for t in turns}:
            if cid not in states:
                states[cid] = self.new_state()
        waves = plan_waves([t.conversation_id for t in turns])
        stats.waves = len(waves)
        for wave in waves:
            mem_rows: list[Row] = []
            emb_rows: list[Row] = []
            opens: list[bool] = []
            for i in wave:
                st = states[turns[i].conversation_id]
                new_seg = self.config.segment.opens_new_segment(
                    len(st.segment_token_ids), st.segment_tokens, len(mem_ids[i]))
                opens.append(new_seg)
                prefix = st.queue if new_seg else st.snapshot
                pieces = ([] if new_seg else list(st.segment_token_ids)) + [mem_ids[i]]
                mem_rows.append(Row(prefix, pieces, [True] * len(pieces)))
                if embed:
                    emb_rows.append(Row(st.queue, [emb_ids[i]], [False]))
            wave_states = [states[turns[i].conversation_id] for i in wave]
            if self.prefix_cache is not None:
                cids = [turns[i].conversation_id for i in wave]
                latents, kept = self._memory_cached(cids, mem_rows, opens, states, stats)
            else:
                latents, kept = self._run("memory_generator", mem_rows, stats), None
            vectors = None
            if embed:
                vectors = (self._run("retriever", emb_rows, stats) if self.query_cache is None
                           else self._embed_ready(emb_rows, wave_states, stats, QueryStats()))
            for j, i in enumerate(wave):
                turn = turns[i]
                st = states[turn.conversation_id]
                delta = StateDelta(seq=turn.seq, new_segment=opens[j], token_ids=mem_ids[i],
                                   latents=latents[j].to("cpu", st.dtype).clone())
                mem_len = st.memory_len
                st.apply(delta)
                if kept is not None:
                    cache = self.prefix_cache
                    assert cache is not None
                    if len(st.segment_token_ids) >= self.config.segment.max_turns:
                        cache.discard(turn.conversation_id)  # the next turn opens a segment: nothing to continue
                    else:
                        cache.store(turn.conversation_id, st, kept[j])
                vec = vectors[j].cpu().numpy() if vectors is not None else None
                outputs[i] = TurnOutput(turn.conversation_id, turn.seq, vec, delta, mem_len, opens[j])
            if self.query_cache is not None:
                self._refresh_ready([turns[i].conversation_id for i in wave], wave_states, stats)
        stats.seconds = time.perf_counter() - t0
        self.last_stats = stats
        return [o for o in outputs if o is not None]

    def embed_queries(self, items: Sequence[tuple[ConversationState | None, str]], *,
                      instruction: bool = True) -> np.ndarray:
        """Query embeddings against each conversation's *current* queue."""
        return self._embed_items([(st, self.renderer.query_ids(q, instruction)) for st, q in items])

    def embed_texts(self, items: Sequence[tuple[ConversationState | None, str]]) -> np.ndarray:
        """Plain texts (tokens + end-of-text) against given queues: the client's encode path."""
        return self._embed_items([(st, self.renderer.text_ids(t)) for st, t in items])

    def _embed_items(self, items: list[tuple[ConversationState | None, list[int]]]) -> np.ndarray:
        rows = [Row(st.queue if st is not None else None, [ids], [False]) for st, ids in items]
        qs = QueryStats(texts=len(items), own_tokens=sum(len(ids) for _, ids in items))
        if self.query_cache is None:
            stats = StepStats()
            out = self._run("retriever", rows, stats)
            qs.positions = stats.real_tokens
        else:
            out = self._embed_ready(rows, [st for st, _ in items], StepStats(), qs)
        self.last_query_stats = qs
        return out.cpu().numpy()

    # -- the query-ready memory (workers/query_cache.py) --------------------------------------
    def ready_point(self, state: ConversationState) -> int:
        """How far into `state`'s queue the query-ready memory reaches (its chunk grid, see
        prefix_pass.py); the queue positions after it are computed with the query's tokens."""
        return self.prefix_pass.keep_point(int(state.queue.shape[0]))

    def _embed_ready(self, rows: list[Row], states: Sequence[ConversationState | None], stats: StepStats,
                     qs: QueryStats) -> torch.Tensor:
        """(B, E) embeddings of retriever rows `queue, own tokens`, each continued from the
        query-ready memory of its queue where the cache holds it (else from position 0)."""
        cache = self.query_cache
        assert cache is not None
        prefixes: list[PrefixState | None] = []
        for st in states:
            p = cache.find(st, self.ready_point(st)) if st is not None and st.queue.shape[0] else None
            prefixes.append(p)
            qs.hits += p is not None
        totals = [r.length(self.L) for r in rows]
        starts = [0 if p is None else p.length for p in prefixes]
        new_lens = [t - s for t, s in zip(totals, starts)]
        out: list[torch.Tensor | None] = [None] * len(rows)
        for group in pack(new_lens, self.config.budget):
            embeds, lens = self.runner.padded_from([rows[i] for i in group], [starts[i] for i in group])
            hidden, _ = self.prefix_pass.run(embeds, lens, [prefixes[i] for i in group], None, adapter="retriever")
            last = hidden[torch.arange(len(group), device=hidden.device), torch.tensor(lens, device=hidden.device) - 1]
            vecs = self.model.pool_embedding(last)
            stats.passes += 1
            stats.padded_tokens += max(lens) * len(group)
            stats.real_tokens += sum(lens)
            reused = sum(starts[i] for i in group)
            stats.query_reused_positions += reused
            stats.per_pass.append(("retriever", len(group), max(lens)))
            qs.positions += sum(lens)
            qs.reused_positions += reused
            for k, i in enumerate(group):
                out[i] = vecs[k]
        return torch.stack(out)  # type: ignore[arg-type]

    def _refresh_ready(self, cids: list[str], states: list[ConversationState], stats: StepStats) -> None:
        """Make each conversation's new queue query-ready: run the retriever over it (continuing
        this conversation's previous entry while the queue only grew) and keep the result."""
        cache = self.query_cache
        assert cache is not None
        todo: list[tuple[str, ConversationState, PrefixState | None, int]] = []
        for cid, st in zip(cids, states):
            k = self.ready_point(st)
            if k == 0:
                cache.discard(cid)  # a queue shorter than one chunk: queries read it whole
                continue
            prev = cache.continuation(cid, st)
            if prev is not None and prev.length == k:
                continue  # already ready (the queue did not change)
            todo.append((cid, st, prev, k))
        if not todo:
            return
        rows = [Row(st.queue[:k], [], []) for _, st, _, k in todo]
        starts = [0 if p is None else p.length for _, _, p, _ in todo]
        new_lens = [k - s for (_, _, _, k), s in zip(todo, starts)]
        for group in pack(new_lens, self.config.budget):
            embeds, lens = self.runner.padded_from([rows[i] for i in group], [starts[i] for i in group])
            _, kept = self.prefix_pass.run(embeds, lens, [todo[i][2] for i in group], [todo[i][3] for i in group],
                                           adapter="retriever")
            stats.passes += 1
            stats.padded_tokens += max(lens) * len(group)
            stats.real_tokens += sum(lens)
            stats.ready_positions += sum(lens)
            stats.per_pass.append(("ready", len(group), max(lens)))
            for n, i in enumerate(group):
                cid, st, _, _ = todo[i]
                cache.store(cid, st, kept[n])

    # -- passes --------------------------------------------------------------------------------
    def _memory_cached(self, cids: list[str], rows: list[Row], opens: list[bool],
                       states: dict[str, ConversationState], stats: StepStats
                       ) -> tuple[torch.Tensor, list[PrefixState]]:
        """Memory latents of one wave, each row continued from its cached segment prefix where the
        cache holds one that matches the state (else from position 0), and the prefix each row
        keeps for its next turn. Rows with different prefix lengths share passes (prefix_pass.py)."""
        cache = self.prefix_cache
        assert cache is not None
        prefixes: list[PrefixState | None] = []
        for cid, new_seg in zip(cids, opens):
            if new_seg:
                cache.discard(cid)          # the old segment's prefix is of no further use
                prefixes.append(None)
                continue
            p = cache.lookup(cid, states[cid])
            prefixes.append(p)
            if p is None:
                stats.prefix_misses += 1
            else:
                stats.prefix_hits += 1
        totals = [r.length(self.L) for r in rows]
        starts = [0 if p is None else p.length for p in prefixes]
        keep = [self.prefix_pass.keep_point(t) for t in totals]
        new_lens = [t - s for t, s in zip(totals, starts)]
        lat: list[torch.Tensor | None] = [None] * len(rows)
        kept: list[PrefixState | None] = [None] * len(rows)
        for group in pack(new_lens, self.config.budget):
            embeds, lens = self.runner.padded_from([rows[i] for i in group], [starts[i] for i in group])
            hidden, states_out = self.prefix_pass.run(embeds, lens, [prefixes[i] for i in group],
                                                      [keep[i] for i in group])
            dev = hidden.device
            idx = torch.tensor(lens, device=dev)[:, None] - self.L + torch.arange(self.L, device=dev)
            picked = hidden.gather(1, idx[:, :, None].expand(-1, -1, hidden.shape[-1]))
            res = self.model.latent_to_mem(picked)
            stats.passes += 1
            stats.padded_tokens += max(lens) * len(group)
            stats.real_tokens += sum(lens)
            stats.reused_positions += sum(starts[i] for i in group)
            stats.per_pass.append(("memory_generator", len(group), max(lens)))
            for k, i in enumerate(group):
                lat[i] = res[k]
                kept[i] = states_out[k]
        return torch.stack(lat), kept  # type: ignore[arg-type,return-value]

    def _run(self, adapter: str, rows: list[Row], stats: StepStats) -> torch.Tensor:
        if not rows:
            return torch.empty(0)
        lengths = [r.length(self.L) for r in rows]
        out: list[torch.Tensor | None] = [None] * len(rows)
        for group in pack(lengths, self.config.budget):
            sub = [rows[i] for i in group]
            res = self.runner.memory_latents(sub) if adapter == "memory_generator" else self.runner.embeddings(sub)
            longest = max(lengths[i] for i in group)
            stats.passes += 1
            stats.padded_tokens += longest * len(group)
            stats.real_tokens += sum(lengths[i] for i in group)
            stats.per_pass.append((adapter, len(group), longest))
            for k, i in enumerate(group):
                out[i] = res[k]
        return torch.stack(out)  # type: ignore[arg-type]


def load_engine(checkpoint: str | Path | LoadedModel, *, device: str = "cpu", dtype: str = "float32",
                backbone_config: str | None = None, config: EngineConfig = EngineConfig()) -> EvoEngine:
    """An engine on `checkpoint`. `dtype="auto"`: the weights load in float32, the compute dtype
    is chosen for this host (workers/precision.py: bfloat16 on CUDA, a measured probe on CPU),
    the memory stays float32; `engine.precision` says what was chosen and why."""
    auto = dtype == "auto"
    lm = checkpoint if isinstance(checkpoint, LoadedModel) else load_checkpoint(
        checkpoint, device=device, dtype="float32" if auto else dtype, backbone_config=backbone_config)
    precision: ProbeResult | None = None
    if auto:
        precision = choose_compute_dtype(lm.model, device)
        lm.model.to({"bfloat16": torch.bfloat16, "float32": torch.float32}[precision.chosen])
        config = replace(config, state_dtype=torch.float32)
    engine = EvoEngine(lm.model, lm.tokenizer, fingerprint=lm.fingerprint,
                       model_name=lm.model.config.base_model_name_or_path, config=config)
    engine.precision = precision
    return engine
