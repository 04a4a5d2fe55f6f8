"""Programs users run beside the workers: the producer of conversation turns (`evostream
produce`, constant memory on files of any size) and the client of a worker's query API.

May import: the stream root modules, schemas, kafka, and api.models (the request bodies).
"""
