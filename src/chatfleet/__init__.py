"""ChatFleet: a Chatchat-style chat and knowledge-base service that stays fast under load."""

__version__ = "0.1.0"
