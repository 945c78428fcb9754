"""The prompts of knowledge-base chat: Chatchat 0.3.1.3's ``rag`` templates, by name.

``default`` puts the retrieved chunks and the question into Chatchat's instruction; ``empty`` is
used when retrieval found nothing (Chatchat switches to it the same way). The templates keep
Chatchat's ``{{context}}`` / ``{{question}}`` placeholders and its Chinese wording, so answers read as
its users expect. They are filled by plain substitution: langchain's mustache renderer
HTML-escapes the values (a chunk's ``<`` would reach the model as ``&lt;``) and jinja2 would run
template code found in a document.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

__all__ = ["RAG_TEMPLATES", "UnknownPrompt", "render_rag_prompt"]

RAG_TEMPLATES: dict[str, str] = {
    "default": (
        "【指令】根据已知信息，简洁和专业的来回答问题。"
        "如果无法从中得到答案，请说 “根据已知信息无法回答该问题”，不允许在答案中添加编造成分，"
        "答案请使用中文。\n\n"
        "【已知信息】{{context}}\n\n"
        "【问题】{{question}}\n"
    ),
    "empty": "请你回答我的问题:\n{{question}}",
}

_PLACEHOLDER = re.compile(r"\{\{\s*(context|question)\s*\}\}")


class UnknownPrompt(ValueError):
    def __init__(self, name: str) -> None:
        super().__init__(f"prompt_name '{name}' is not a RAG prompt template; use one of "
                         f"{', '.join(sorted(RAG_TEMPLATES))}")


def render_rag_prompt(prompt_name: str, *, question: str, contexts: Sequence[str]) -> str:
    """The user message for one knowledge-base question. With no contexts, the ``empty`` template
    (whatever ``prompt_name`` says, as Chatchat does)."""
    if prompt_name not in RAG_TEMPLATES:
        raise UnknownPrompt(prompt_name)
    template = RAG_TEMPLATES[prompt_name if contexts else "empty"]
    values = {"context": "\n\n".join(contexts), "question": question}
    return _PLACEHOLDER.sub(lambda match: values[match.group(1)], template)
