"""Helpers shared by the test suite: managed subprocesses and a real vLLM (CPU) server."""
