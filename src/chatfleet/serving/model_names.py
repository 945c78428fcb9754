"""Which model names a request may send: the served model, and its aliases.

A gateway serves one model. Clients written for another deployment send that deployment's names:
Chatchat's WebUI sends the model of its own settings (``qwen:7b``, ``glm4-chat``), which would
otherwise be refused. ``engine.model_aliases`` lists names that mean the served model (``*``:
any name). Answers always name the served model, so a client can see what answered it, and the
engine is always asked for the served model (an upstream vLLM knows only its own name).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ANY_NAME", "ModelNames"]

ANY_NAME = "*"
"""The alias that accepts every model name."""


@dataclass(frozen=True, kw_only=True, slots=True)
class ModelNames:
    served: str
    aliases: tuple[str, ...] = ()

    @property
    def listed(self) -> tuple[str, ...]:
        """The ids /v1/models lists: the served model first, then each named alias."""
        return (self.served, *(a for a in self.aliases if a not in (ANY_NAME, self.served)))

    def accepts(self, requested: str | None) -> bool:
        """Whether a request naming ``requested`` is served; no name at all means the served
        model (Chatchat's routes make ``model`` optional)."""
        return (not requested or requested == self.served or ANY_NAME in self.aliases
                or requested in self.aliases)

    def refusal(self, requested: str) -> str:
        """What a client that sent an unknown name is told: what is served and how to fix it."""
        return (f"model '{requested}' is not served here; this deployment serves "
                f"'{self.served}': send that name (GET /v1/models lists it), or have the operator "
                f"add '{requested}' to CHATFLEET_ENGINE__MODEL_ALIASES")
