"""Knowledge bases: loading, splitting, embedding, storing and retrieving documents (RAG).

``rag`` sits beside ``serving`` under ``api``: routes call it to ingest and retrieve, then hand the
prompt it builds to the completion service. It never imports ``api`` or ``serving``.
"""
