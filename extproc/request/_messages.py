"""Reading OpenAI chat ``messages``: the text and the images of a conversation.

One place for this, used by the cheap signals here and by the learned scorers in
``routers``. Messages follow the OpenAI chat format: ``content`` is a string, or a list of
parts ``{"type": "text", "text": ...}`` / ``{"type": "image_url", "image_url": {"url": ...}}``.
Nothing here fetches a URL.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = ["message_text", "conversation_text", "last_user_text", "image_urls"]


def message_text(message: Mapping[str, Any]) -> str:
    """The text of one message: its string content, or its text parts joined by newlines."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = [
            part["text"]
            for part in content
            if isinstance(part, Mapping)
            and part.get("type") in ("text", "input_text")
            and isinstance(part.get("text"), str)
        ]
        return "\n".join(texts)
    return ""


def conversation_text(messages: Sequence[Mapping[str, Any]]) -> str:
    """The text of every message, in order, joined by newlines (roles are not included)."""
    return "\n".join(t for t in (message_text(m) for m in messages if isinstance(m, Mapping)) if t)


def last_user_text(messages: Sequence[Mapping[str, Any]]) -> str:
    """The text of the last ``user`` message, or ``""`` when there is none."""
    for message in reversed(messages):
        if isinstance(message, Mapping) and message.get("role") == "user":
            return message_text(message)
    return ""


def image_urls(messages: Iterable[Mapping[str, Any]]) -> list[str]:
    """Every image URL (``data:`` or remote) in the conversation, in order. Never fetched."""
    urls: list[str] = []
    for message in messages:
        if not isinstance(message, Mapping):
            continue
        content = message.get("content")
        if not isinstance(content, list):
            continue
        for part in content:
            if not isinstance(part, Mapping) or part.get("type") not in ("image_url", "input_image"):
                continue
            ref = part.get("image_url")
            url = ref.get("url") if isinstance(ref, Mapping) else ref
            if isinstance(url, str):
                urls.append(url)
    return urls
