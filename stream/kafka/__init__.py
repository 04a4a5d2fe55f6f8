"""Kafka: topics and their administration, the producer that never drops (emitter), broker
health, client security (TLS/SASL) for every client, consumer tuning and lag, and unreadable
record batches (which stop their partition, not the worker).

May import: the stream root modules (settings, backoff), schemas. Nothing from state,
processing, runtime or api: Kafka does not know what a conversation's memory is.
"""
