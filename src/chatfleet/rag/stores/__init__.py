"""Knowledge stores: one interface (``base.KnowledgeStore``), two backends (``local``, ``pgvector``)."""
