"""Load generation and benchmark reports (``chatfleet bench``).

- ``workload``: what to send and when (Poisson, trace replay, closed loop; synthesized prompts).
- ``loadgen``: the async streaming client that sends a workload and times every token.
- ``report``: statistics, goodput, JSON, plots and tables.
- ``cli``: the ``bench`` typer app the top-level CLI mounts.
"""
