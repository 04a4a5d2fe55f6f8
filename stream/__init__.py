"""evostream: Kafka turns in, evolved embeddings out, every conversation's latent memory in Redis.

The path of one turn, room by room (each room's `__init__` says what it holds and what it may
import; tests/test_architecture.py checks the rules):

    kafka/       consumed by the faust app (runtime/app.py) in micro-batches
    processing/  decode -> admit -> model step (workers/) -> commit: checkpoint (state/),
                 emit (kafka/), clear the outbox, acknowledge
    state/       the memory-state store in Redis (and its cache and cold tier)
    runtime/     the worker process that wires them together
    api/         HTTP: queries against a conversation's live memory, health, metrics
    cli/         the `evostream` command line
    clients/     producers and query clients users run next to the workers
    index/       downstream indexing of the embeddings topic and search

Root modules are the vocabulary every room shares: `identity` (who a conversation is),
`settings` (every setting, validated), `backoff` (the retry schedule).
"""
