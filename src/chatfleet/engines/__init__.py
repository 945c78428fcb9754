"""engines layer of ChatFleet; see docs/architecture.md."""
