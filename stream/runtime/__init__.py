"""The worker process: what it holds and how long it lives (worker.py), the faust app it runs
(app.py), the one thread that owns the model (model_thread.py), bounded shutdown, metrics and
logs.

`worker` and `app` compose every other room and are imported only by the CLI. The leaf
modules (logs, log_limits, metrics, model_thread, shutdown) import nothing else of runtime and
may be used by processing and api.
"""
