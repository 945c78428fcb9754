"""A pod's gateway as several worker processes (``server.workers`` above 1): the supervisor that
starts, watches, restarts and drains them (``supervisor.py``), what runs in each worker
(``worker.py``), and the small pure parts: the ``auto`` worker count (``cpu.py``) and the restart
backoff (``backoff.py``). docs/operations.md, "Worker processes", is the operator's view.
"""
