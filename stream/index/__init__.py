"""Downstream of the embeddings topic (issue #19): the sink that keeps turn vectors searchable
in PostgreSQL + pgvector (or a SQLite file) and the search over them. `ops` (what each record
does, a batch planned into a few statements), `base` (the `VectorIndex` interface), `pgvector`
and `sqlite` (its two backends), `sink` (the consumer: offsets committed with the rows).

May import: the stream root modules, schemas, kafka, clients (to embed a query). Imported by
the CLI (`evostream sink`, `evostream search`) and the API (`POST /v1/search`).
"""
