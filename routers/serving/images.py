"""Reading a request's images for an in-process scorer, under the policy's limits.

``image_url`` (and ``input_image``) parts are turned into decoded PIL images before the
backbone sees them, so the backbone never decodes or fetches anything itself:

- ``data:`` URLs: the encoded size is checked against ``max_bytes`` before base64 decoding,
  the header's width × height against ``max_pixels`` before the pixels are decoded (a
  decompression bomb is refused without allocating it), then the image is fully decoded (a
  truncated file fails here).
- ``http``/``https`` URLs: fetched only when the host is in ``allow_hosts`` (exact,
  case-insensitive; default empty, so nothing is ever fetched and no connection is opened),
  with ``fetch_timeout_ms`` (and the request's deadline) bounding the whole fetch, at most
  ``max_bytes`` read, redirects not followed; then decoded as above.
- Anything else (other schemes, a refused or broken image) raises :class:`ScorerError`, so
  the policy takes its fallback.

Blocking (decoding, network): call from a worker thread, never on the event loop.
"""

from __future__ import annotations

import base64
import binascii
import http.client
import io
import time
import urllib.parse
from collections.abc import Mapping, Sequence
from typing import Any

from extproc import ImageLimits, ScorerError

__all__ = ["decode_image_bytes", "decode_data_url", "fetch_image", "load_image", "with_loaded_images", "has_images"]

_IMAGE_PARTS = ("image_url", "input_image")
_CHUNK = 64 * 1024


def has_images(messages: Sequence[Mapping[str, Any]]) -> bool:
    """Whether any message has an image part (cheap: no decoding)."""
    for message in messages:
        content = message.get("content") if isinstance(message, Mapping) else None
        if isinstance(content, list) and any(isinstance(p, Mapping) and p.get("type") in _IMAGE_PARTS for p in content):
            return True
    return False


def decode_image_bytes(raw: bytes, limits: ImageLimits, source: str = "an image") -> Any:
    """A decoded RGB PIL image from encoded bytes; :class:`ScorerError` when over the
    limits or broken. ``source`` names the image in the error."""
    from PIL import Image

    if len(raw) > limits.max_bytes:
        raise ScorerError(f"{source} is {len(raw)} bytes, over images.max_bytes={limits.max_bytes}.")
    try:
        image = Image.open(io.BytesIO(raw))  # reads the header only
        width, height = image.size
        if width * height > limits.max_pixels:
            raise ScorerError(
                f"{source} is {width}x{height} pixels, over images.max_pixels={limits.max_pixels}; not decoded."
            )
        image.load()
        return image.convert("RGB")
    except ScorerError:
        raise
    except Image.DecompressionBombError as exc:
        raise ScorerError(f"{source} was refused as a decompression bomb: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - untrusted bytes: Pillow raises OSError, SyntaxError, struct.error, ...
        raise ScorerError(f"Cannot decode {source}: {type(exc).__name__}: {exc}") from exc


def decode_data_url(url: str, limits: ImageLimits) -> Any:
    """Decode a ``data:image/...;base64,...`` URL under ``limits``."""
    header, comma, payload = url.partition(",")
    if not comma or not header.endswith(";base64"):
        raise ScorerError("A data: image URL must be base64-encoded ('data:<type>;base64,<data>').")
    if len(payload) * 3 // 4 > limits.max_bytes:
        raise ScorerError(f"A data: image is about {len(payload) * 3 // 4} bytes, over images.max_bytes={limits.max_bytes}.")
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ScorerError(f"A data: image URL is not valid base64: {exc}") from exc
    return decode_image_bytes(raw, limits, "a data: image")


def fetch_image(url: str, limits: ImageLimits, deadline: float | None = None) -> bytes:
    """The bytes at an http(s) ``url`` whose host is in ``limits.allow_hosts``.

    The host is checked before any connection is made. The fetch ends by
    ``fetch_timeout_ms`` or ``deadline`` (``time.monotonic()``), whichever comes first;
    only status 200 is accepted (redirects are not followed); at most ``max_bytes`` are read.
    """
    parts = urllib.parse.urlsplit(url)
    host = (parts.hostname or "").lower()
    allowed = {h.lower() for h in limits.allow_hosts}
    if parts.scheme not in ("http", "https"):
        raise ScorerError(f"Image URLs must be data:, http: or https:, got scheme {parts.scheme or '(none)'!r}.")
    if host not in allowed:
        raise ScorerError(
            f"Image host {host!r} is not in images.allow_hosts ({', '.join(sorted(allowed)) or 'empty'}); not fetched."
        )
    end = time.monotonic() + limits.fetch_timeout_ms / 1000.0
    if deadline is not None:
        end = min(end, deadline)
    remaining = end - time.monotonic()
    if remaining <= 0:
        raise ScorerError(f"No time left to fetch an image from {host!r}.")
    try:
        port = parts.port
    except ValueError as exc:
        raise ScorerError(f"Image URL has a bad port: {exc}") from exc
    connection_class = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    connection = connection_class(parts.hostname, port, timeout=remaining)
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    try:
        connection.request("GET", path, headers={"Accept": "image/*", "User-Agent": "switchyard"})
        response = connection.getresponse()
        if response.status != 200:
            raise ScorerError(f"Fetching an image from {host!r} gave HTTP {response.status} (redirects are not followed).")
        declared = response.getheader("Content-Length")
        if declared is not None and declared.isdigit() and int(declared) > limits.max_bytes:
            raise ScorerError(f"An image from {host!r} is {declared} bytes, over images.max_bytes={limits.max_bytes}.")
        chunks: list[bytes] = []
        size = 0
        while True:
            left = end - time.monotonic()
            if left <= 0:
                raise ScorerError(f"Fetching an image from {host!r} took longer than its time limit.")
            if connection.sock is not None:
                connection.sock.settimeout(left)
            chunk = response.read1(_CHUNK) if hasattr(response, "read1") else response.read(_CHUNK)
            if not chunk:
                break
            size += len(chunk)
            if size > limits.max_bytes:
                raise ScorerError(f"An image from {host!r} is over images.max_bytes={limits.max_bytes}.")
            chunks.append(chunk)
        return b"".join(chunks)
    except ScorerError:
        raise
    except (OSError, http.client.HTTPException) as exc:  # timeouts are OSError too
        raise ScorerError(f"Cannot fetch an image from {host!r}: {type(exc).__name__}: {exc}") from exc
    finally:
        connection.close()


def load_image(url: Any, limits: ImageLimits, deadline: float | None = None) -> Any:
    """A decoded RGB PIL image from a ``data:`` or allowed http(s) URL."""
    if not isinstance(url, str) or not url:
        raise ScorerError("An image part has no URL.")
    if url.startswith("data:"):
        return decode_data_url(url, limits)
    host = (urllib.parse.urlsplit(url).hostname or "?").lower()
    return decode_image_bytes(fetch_image(url, limits, deadline), limits, f"the image from {host!r}")


def with_loaded_images(
    messages: Sequence[Mapping[str, Any]], limits: ImageLimits, deadline: float | None = None
) -> list[Mapping[str, Any]]:
    """A shallow copy of ``messages`` whose image parts are ``{"type": "image", "image": <PIL>}``
    (what the backbone takes). The request's own messages are not changed."""
    out: list[Mapping[str, Any]] = []
    for message in messages:
        content = message.get("content") if isinstance(message, Mapping) else None
        if not isinstance(content, list) or not any(
            isinstance(p, Mapping) and p.get("type") in _IMAGE_PARTS for p in content
        ):
            out.append(message)
            continue
        parts = []
        for part in content:
            if isinstance(part, Mapping) and part.get("type") in _IMAGE_PARTS:
                ref = part.get("image_url")
                url = ref.get("url") if isinstance(ref, Mapping) else ref
                parts.append({"type": "image", "image": load_image(url, limits, deadline)})
            else:
                parts.append(part)
        out.append({**message, "content": parts})
    return out
