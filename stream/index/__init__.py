"""Downstream of the embeddings topic: the indexer that keeps turn vectors searchable and the
search over them.

May import: the stream root modules, schemas, kafka, clients (to embed a query).
"""
