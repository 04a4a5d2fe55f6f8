"""A conversation's memory state in Redis: the store (keys, records, codec, commit planner,
Lua scripts, durability, TTL policy, server checks, operator inspection), the in-process state
cache, the cold tier for idle conversations, the Redis client factory, and what "unavailable"
means.

May import: the stream root modules, schemas, workers (the state's byte format). Nothing from
kafka, processing, runtime or api.
"""
