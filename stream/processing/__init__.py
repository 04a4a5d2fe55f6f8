"""The data path of one micro-batch: decode (records -> events, or dead letters with a reason),
views (where each conversation stands), admission (order, replays, gaps, limits), the model
step, and the commit protocol (checkpoint -> emit -> clear outbox -> acknowledge) in
commit.py; pipeline.py reads top to bottom through them.

May import: the stream root modules, schemas, workers, kafka, state, and the runtime's leaf
modules `logs` and `metrics`. Never devtools (fault injection observes commit.STAGES from
outside) and never the runtime's worker or app.
"""
