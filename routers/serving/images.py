"""Reading a request's images for a scorer, under the policy's limits.

``image_url`` (and ``input_image``) parts are turned into decoded PIL images before the
backbone runs, so a model never decodes or fetches anything itself:

- The request as a whole (:class:`extproc.ImageLimits`' per-request fields): more than
  ``max_images`` images, or ``data:`` images over ``max_total_bytes`` together, are refused
  before any image is decoded. Then, image by image (:class:`ImageBudget`), the request's
  deadline is checked before each one, fetched bytes count against ``max_total_bytes`` as
  they arrive, and each header's width × height against ``max_total_pixels`` before its
  pixels are decoded.
- ``data:`` URLs: the encoded size is checked against ``max_bytes`` before base64 decoding,
  the header's width × height against ``max_pixels`` before the pixels are decoded (a
  decompression bomb is refused without allocating it), then the image is fully decoded (a
  truncated file fails here).
- ``http``/``https`` URLs: fetched only when ``allow_hosts`` allows the host and the port
  (:meth:`extproc.ImageLimits.allows`: an entry ``host`` allows the scheme's default port
  only, ``host:port`` that port; default empty, so nothing is ever fetched and no
  connection is opened), with ``fetch_timeout_ms`` (and the request's deadline) bounding
  the whole fetch, at most ``max_bytes`` read, redirects not followed; then decoded as above.
- Anything else (other schemes, a refused or broken image, a deadline passed between
  images) raises :class:`ScorerError`, so the policy takes its fallback.

Blocking (decoding, network): call from a worker thread, never on the event loop.
"""

from __future__ import annotations

import base64
import binascii
import http.client
import io
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from extproc import ImageLimits, ScorerError

__all__ = [
    "ImageBudget",
    "check_request_images",
    "decode_image_bytes",
    "decode_data_url",
    "fetch_image",
    "load_image",
    "with_loaded_images",
    "has_images",
]

_IMAGE_PARTS = ("image_url", "input_image")
_CHUNK = 64 * 1024


def has_images(messages: Sequence[Mapping[str, Any]]) -> bool:
    """Whether any message has an image part (cheap: no decoding)."""
    return next(_image_parts(messages), None) is not None


def _image_parts(messages: Sequence[Mapping[str, Any]]) -> Iterator[Mapping[str, Any]]:
    for message in messages:
        content = message.get("content") if isinstance(message, Mapping) else None
        if isinstance(content, list):
            yield from (p for p in content if isinstance(p, Mapping) and p.get("type") in _IMAGE_PARTS)


def _part_url(part: Mapping[str, Any]) -> Any:
    ref = part.get("image_url")
    return ref.get("url") if isinstance(ref, Mapping) else ref


def _data_url_bytes(url: Any) -> int:
    """The decoded size of a base64 ``data:`` URL's payload (0 for anything else)."""
    if not isinstance(url, str) or not url.startswith("data:"):
        return 0
    return (len(url) - url.find(",") - 1) * 3 // 4 if "," in url else 0


def check_request_images(messages: Sequence[Mapping[str, Any]], limits: ImageLimits) -> None:
    """Refuse a request whose images are over its budget on their face, before any image
    is decoded: more than ``max_images`` images, or ``data:`` images over
    ``max_total_bytes`` together. Cheap: nothing is decoded."""
    urls = [_part_url(part) for part in _image_parts(messages)]
    if len(urls) > limits.max_images:
        raise ScorerError(f"The request has {len(urls)} images, over images.max_images={limits.max_images}; none decoded.")
    total = sum(_data_url_bytes(url) for url in urls)
    if total > limits.max_total_bytes:
        raise ScorerError(
            f"The request's data: images are about {total} bytes together, over "
            f"images.max_total_bytes={limits.max_total_bytes}; none decoded."
        )


class ImageBudget:
    """What one request's images may still use as they are read in order: their count,
    encoded bytes and pixels (``limits``' per-request fields), and time (``deadline``, a
    ``clock()`` value; None: no deadline)."""

    def __init__(
        self, limits: ImageLimits, deadline: float | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.limits = limits
        self.deadline = deadline
        self.clock = clock
        self.images = 0
        self.bytes = 0
        self.pixels = 0

    def next_image(self) -> None:
        """Called before each image is read: refuses one image too many, or any image once the
        request's deadline has passed."""
        if self.images >= self.limits.max_images:
            raise ScorerError(f"The request has more than images.max_images={self.limits.max_images} images.")
        if self.deadline is not None and self.clock() >= self.deadline:
            raise ScorerError(
                f"The request's deadline passed after {self.images} of its images were read; the rest were not."
            )
        self.images += 1

    def take_bytes(self, size: int, source: str) -> None:
        self.bytes += size
        if self.bytes > self.limits.max_total_bytes:
            raise ScorerError(
                f"{source} brings the request's images to {self.bytes} bytes, over "
                f"images.max_total_bytes={self.limits.max_total_bytes}; not decoded."
            )

    def take_pixels(self, width: int, height: int, source: str) -> None:
        self.pixels += width * height
        if self.pixels > self.limits.max_total_pixels:
            raise ScorerError(
                f"{source} ({width}x{height}) brings the request's images to {self.pixels} pixels, over "
                f"images.max_total_pixels={self.limits.max_total_pixels}; not decoded."
            )


def decode_image_bytes(raw: bytes, limits: ImageLimits, source: str = "an image", budget: ImageBudget | None = None) -> Any:
    """A decoded RGB PIL image from encoded bytes; :class:`ScorerError` when over the
    limits (and the request's ``budget``, if given) or broken. ``source`` names the image
    in the error."""
    from PIL import Image

    if len(raw) > limits.max_bytes:
        raise ScorerError(f"{source} is {len(raw)} bytes, over images.max_bytes={limits.max_bytes}.")
    if budget is not None:
        budget.take_bytes(len(raw), source)
    try:
        image = Image.open(io.BytesIO(raw))  # reads the header only
        width, height = image.size
        if width * height > limits.max_pixels:
            raise ScorerError(
                f"{source} is {width}x{height} pixels, over images.max_pixels={limits.max_pixels}; not decoded."
            )
        if budget is not None:
            budget.take_pixels(width, height, source)
        return _decode_pixels(image)
    except ScorerError:
        raise
    except Image.DecompressionBombError as exc:
        raise ScorerError(f"{source} was refused as a decompression bomb: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - untrusted bytes: Pillow raises OSError, SyntaxError, struct.error, ...
        raise ScorerError(f"Cannot decode {source}: {type(exc).__name__}: {exc}") from exc


def _decode_pixels(image: Any) -> Any:
    """The one place pixels are decoded: an opened image, checked, loaded as RGB."""
    image.load()
    return image.convert("RGB")


def decode_data_url(url: str, limits: ImageLimits, budget: ImageBudget | None = None) -> Any:
    """Decode a ``data:image/...;base64,...`` URL under ``limits`` (and ``budget``)."""
    header, comma, payload = url.partition(",")
    if not comma or not header.endswith(";base64"):
        raise ScorerError("A data: image URL must be base64-encoded ('data:<type>;base64,<data>').")
    if len(payload) * 3 // 4 > limits.max_bytes:
        raise ScorerError(f"A data: image is about {len(payload) * 3 // 4} bytes, over images.max_bytes={limits.max_bytes}.")
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ScorerError(f"A data: image URL is not valid base64: {exc}") from exc
    return decode_image_bytes(raw, limits, "a data: image", budget)


def _where(parts: urllib.parse.SplitResult) -> str:
    """``host`` or ``host:port`` of a URL, as errors name it."""
    host = (parts.hostname or "").lower()
    try:
        port = parts.port
    except ValueError:
        port = None
    return host if port is None else f"{host}:{port}"


def fetch_image(url: str, limits: ImageLimits, deadline: float | None = None) -> bytes:
    """The bytes at an http(s) ``url`` whose host and port ``limits.allow_hosts`` allows.

    The host and port are checked before any connection is made. The fetch ends by
    ``fetch_timeout_ms`` or ``deadline`` (``time.monotonic()``), whichever comes first;
    only status 200 is accepted (redirects are not followed); at most ``max_bytes`` are read.
    """
    parts = urllib.parse.urlsplit(url)
    host = (parts.hostname or "").lower()
    if parts.scheme not in ("http", "https"):
        raise ScorerError(f"Image URLs must be data:, http: or https:, got scheme {parts.scheme or '(none)'!r}.")
    try:
        port = parts.port
    except ValueError as exc:
        raise ScorerError(f"Image URL has a bad port: {exc}") from exc
    if not limits.allows(parts.scheme, host, port):
        raise ScorerError(
            f"Image host {_where(parts)!r} is not in images.allow_hosts "
            f"({', '.join(sorted(limits.allow_hosts)) or 'empty'}); not fetched."
        )
    end = time.monotonic() + limits.fetch_timeout_ms / 1000.0
    if deadline is not None:
        end = min(end, deadline)
    remaining = end - time.monotonic()
    if remaining <= 0:
        raise ScorerError(f"No time left to fetch an image from {host!r}.")
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


def load_image(url: Any, limits: ImageLimits, deadline: float | None = None, budget: ImageBudget | None = None) -> Any:
    """A decoded RGB PIL image from a ``data:`` or allowed http(s) URL (counted against the
    request's ``budget``, if given)."""
    if not isinstance(url, str) or not url:
        raise ScorerError("An image part has no URL.")
    if url.startswith("data:"):
        return decode_data_url(url, limits, budget)
    host = (urllib.parse.urlsplit(url).hostname or "?").lower()
    return decode_image_bytes(fetch_image(url, limits, deadline), limits, f"the image from {host!r}", budget)


def with_loaded_images(
    messages: Sequence[Mapping[str, Any]],
    limits: ImageLimits,
    deadline: float | None = None,
    *,
    clock: Callable[[], float] = time.monotonic,
) -> list[Mapping[str, Any]]:
    """A shallow copy of ``messages`` whose image parts are ``{"type": "image", "image": <PIL>}``
    (what the backbone takes), read under ``limits`` for the image and for the request
    (:func:`check_request_images` first, then an :class:`ImageBudget` ending at
    ``deadline``, a ``clock()`` value). The request's own messages are not changed."""
    check_request_images(messages, limits)
    budget = ImageBudget(limits, deadline, clock)
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
                budget.next_image()
                parts.append({"type": "image", "image": load_image(_part_url(part), limits, deadline, budget)})
            else:
                parts.append(part)
        out.append({**message, "content": parts})
    return out
