"""Learned scorers as the policy sees them: a spec from the policy, and an async ``score``.

``extproc`` defines the interface and stays torch-free; ``routers`` implements the
in-process scorers (probes on a shared backbone prefill, LatentRouter) behind a
micro-batcher, and ``extproc.scoring._remote`` implements the gRPC client for
``switchyard scorer serve``.

How a policy reaches a scorer::

    scorers.<name> (YAML) ─► ScorerSpec (frozen, compared on reload)
        ─► ScorerLoader.load(spec) ─► Scorer   (owned by the server, reused across reloads)
    rule needs signal `kind: score` ─► engine asks for the scorer ─► servicer awaits
        Scorer.score(request, deadline) ─► Scores ─► engine decides (or takes `fallback`)

A scorer never decides a route by itself: it returns numbers, the engine compares them with
thresholds (``score`` signals) or turns them into utilities (``route.utility`` rules).

Loaders are found by ``kind`` through the ``switchyard.scorers`` entry-point group (the
``routers`` package registers ``probe`` and ``latent_router``), so ``extproc`` never
imports ``routers`` by name; a remote spec never needs a loader.
"""

from __future__ import annotations

import abc
import math
import re
import urllib.parse
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from extproc.request._body import RoutingRequest

__all__ = [
    "BatchConfig",
    "BreakerConfig",
    "ImageLimits",
    "RemoteConfig",
    "RemoteTls",
    "ScorerSpec",
    "Scores",
    "Scorer",
    "ScorerLoader",
    "ScorerDescription",
    "ScorerFailure",
    "ScoresNeeded",
    "ScoringFailed",
    "score_key",
    "pem_problem",
]


@dataclass(frozen=True)
class BatchConfig:
    """How the in-process micro-batcher groups requests into one forward."""

    max_size: int = 32
    max_wait_ms: float = 4.0


@dataclass(frozen=True)
class BreakerConfig:
    """When a scorer's circuit breaker opens (``scorers.<name>.breaker``; see ``extproc.scoring._breaker``).

    ``failures``: consecutive failed calls (deadline missed, error, overload) that open it; 0
    turns the breaker off. ``cool_off_ms``: how long it stays open before one request tries
    the scorer again.
    """

    failures: int = 5
    cool_off_ms: float = 5000.0


@dataclass(frozen=True)
class ImageLimits:
    """What a scorer accepts of ``image_url`` parts: the one declaration of the image limits
    (serving, ``policy explain``, training and evaluation read images under them).

    Each image: ``data:`` URLs are decoded under ``max_bytes`` (encoded size) and
    ``max_pixels`` (width × height; a decompression bomb is refused before it is decoded).
    http(s) URLs are fetched only from ``allow_hosts`` (empty: never fetched), within
    ``fetch_timeout_ms`` and ``max_bytes``. An entry ``host`` allows that host on the URL
    scheme's default port only (80 for http, 443 for https); ``host:port`` allows that port
    (an IPv6 address in brackets: ``[::1]:8080``).

    Each request: at most ``max_images`` images, ``max_total_bytes`` encoded bytes and
    ``max_total_pixels`` pixels together, checked before the images (or the next image) are
    decoded; the request's deadline is checked between images. A refused or broken image
    is a scorer failure, so the policy takes its fallback.
    """

    max_bytes: int = 10 * 1024 * 1024
    max_pixels: int = 40_000_000
    allow_hosts: tuple[str, ...] = ()
    fetch_timeout_ms: float = 2000.0
    max_images: int = 16
    max_total_bytes: int = 20 * 1024 * 1024
    max_total_pixels: int = 50_000_000

    def __post_init__(self) -> None:
        for name in ("max_bytes", "max_pixels", "max_images", "max_total_bytes", "max_total_pixels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`images.{name}` must be a positive integer, got {value!r}.")
        for entry in self.allow_hosts:
            _host_entry(entry)

    def allows(self, scheme: str, host: str, port: int | None) -> bool:
        """Whether ``allow_hosts`` lets an image be fetched from ``scheme://host:port``
        (``port`` None: the scheme's default)."""
        default = _DEFAULT_PORTS.get(scheme)
        port = default if port is None else port
        host = host.lower()
        for entry in self.allow_hosts:
            allowed_host, allowed_port = _host_entry(entry)
            if allowed_host == host and (default if allowed_port is None else allowed_port) == port:
                return True
        return False


#: The port an ``allow_hosts`` entry without one allows, by URL scheme.
_DEFAULT_PORTS = {"http": 80, "https": 443}


def _host_entry(entry: str) -> tuple[str, int | None]:
    """The (lower-case host, port or None) of an ``images.allow_hosts`` entry."""
    shape = "write `host` or `host:port` (an IPv6 address in brackets)"
    if not isinstance(entry, str) or not entry or entry.endswith(":") or any(c in entry for c in "/?#@ "):
        raise ValueError(f"`images.allow_hosts` entry {entry!r} is not a host; {shape}.")
    parts = urllib.parse.urlsplit("//" + entry)
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"`images.allow_hosts` entry {entry!r} has a bad port; {shape}.") from None
    if not parts.hostname:
        raise ValueError(f"`images.allow_hosts` entry {entry!r} is not a host; {shape}.")
    return parts.hostname.lower(), port


#: The kinds of PEM file a TLS setting needs, and how the BEGIN line of each kind's block ends.
_PEM_ENDINGS = {"certificate": b"CERTIFICATE-----", "private key": b"PRIVATE KEY-----"}


def pem_problem(data: bytes, kind: str) -> str | None:
    """Why ``data`` holds no PEM ``kind`` (``certificate`` or ``private key``), as the end of a
    sentence naming the file (``holds no PEM certificate (no `-----BEGIN ...CERTIFICATE-----` line)``);
    None when it holds one. The policy's ``remote.tls`` files and ``scorer serve``'s are checked here."""
    ending = _PEM_ENDINGS[kind]
    if re.search(rb"^-----BEGIN [A-Z0-9 ]*" + re.escape(ending), data, re.MULTILINE) is None:
        return f"holds no PEM {kind} (no `-----BEGIN ...{ending.decode()}` line)"
    return None


@dataclass(frozen=True)
class RemoteTls:
    """TLS of a remote scorer's channel (``scorers.<name>.remote.tls``).

    Absolute paths of PEM files, read when the channel is created: ``ca`` verifies the
    server's certificate; ``cert`` + ``key`` (both or neither) are this client's certificate
    and key for mutual TLS; ``server_name`` (None: the target's host) is the name the
    server's certificate must carry.
    """

    ca: str
    cert: str | None = None
    key: str | None = None
    server_name: str | None = None

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            given, missing = ("cert", "key") if self.cert is not None else ("key", "cert")
            raise ValueError(f"`tls.{given}` is set but `tls.{missing}` is not; mutual TLS needs both.")


@dataclass(frozen=True)
class RemoteConfig:
    """A scorer served by ``switchyard scorer serve`` elsewhere.

    ``target`` is a gRPC target (``dns:///scorer.ns.svc.cluster.local:50061`` balances over
    every address the name returns); ``scorer`` is the scorer's name in the remote config
    (default: the same name as here); ``tls`` None: a plaintext channel.
    """

    target: str
    scorer: str | None = None
    tls: RemoteTls | None = None


@dataclass(frozen=True)
class ScorerSpec:
    """One validated ``scorers.<name>`` entry. Frozen: a reload compares specs to decide
    whether a loaded scorer can be reused.

    - ``checkpoints``: probe kind; output name -> absolute checkpoint folder.
    - ``checkpoint``: latent_router kind; the absolute checkpoint folder.
    - ``backends``: latent_router kind; pool model name -> policy backend name.
    - ``device`` / ``dtype``: where the in-process model runs (runtime settings, not saved
      in the checkpoint). ``dtype`` None: float32 on CPU, bfloat16 on CUDA.
    - ``deadline_ms``: the scorer's answer must arrive within this many ms of the request's
      arrival; otherwise the policy takes its fallback.
    - ``remote``: score over gRPC instead of in process (``checkpoints``/``checkpoint`` then
      describe nothing local and are optional).
    - ``fingerprint``: the checkpoint files' identity (``checkpoint_fingerprint``) when the spec was
      built, so a checkpoint replaced in place loads as a new scorer on reload.
    - ``breaker``: when its circuit breaker opens; ``fallback``: the backend a request takes
      when this scorer fails (None: the policy's ``fallback``). Neither is part of the load
      key: they are read per request.
    """

    name: str
    kind: str
    checkpoints: tuple[tuple[str, str], ...] = ()
    checkpoint: str | None = None
    backends: tuple[tuple[str, str], ...] = ()
    device: str = "cpu"
    dtype: str | None = None
    batch: BatchConfig = field(default_factory=BatchConfig)
    deadline_ms: float = 150.0  # bench/deadline.py: 99.6% scored at 8 clients on a 2-core CPU (80 ms: 70%)
    images: ImageLimits = field(default_factory=ImageLimits)
    remote: RemoteConfig | None = None
    fingerprint: str = ""
    breaker: BreakerConfig = field(default_factory=BreakerConfig)
    fallback: str | None = None

    def load_key(self) -> tuple[Any, ...]:
        """What identifies the loaded model: equal keys share one loaded scorer across a
        reload (the deadline is not part of it; it is read per request)."""
        remote_name = self.name if self.remote is not None and self.remote.scorer is None else None
        return (self.kind, self.checkpoints, self.checkpoint, self.device, self.dtype, self.batch,
                self.images, self.remote, remote_name, self.fingerprint)


@dataclass(frozen=True)
class Scores:
    """One request's scores from one scorer.

    ``values``: output name -> score (a probe's P(small model correct), or a pool model's
    predicted quality for LatentRouter). ``costs``: LatentRouter only, pool model -> the
    normalised cost its utility uses (quality − λ·cost). ``batch_size``: how many requests
    shared the forward (1 when unbatched; 0 when unknown, e.g. remote).
    """

    values: Mapping[str, float]
    costs: Mapping[str, float] = field(default_factory=dict)
    batch_size: int = 0

    def non_finite(self) -> str | None:
        """The first value or cost that is not a finite number, as ``values['small'] = nan``;
        None when every one is. Whoever receives scores checks them here."""
        for part, numbers in (("values", self.values), ("costs", self.costs)):
            for name, value in numbers.items():
                if not isinstance(value, (int, float)) or not math.isfinite(value):
                    return f"{part}[{name!r}] = {value!r}"
        return None


@dataclass(frozen=True)
class ScorerFailure:
    """Why a scorer gave no usable scores for a request: ``reason`` is one of ``deadline``,
    ``overload``, ``breaker_open``, ``error``, ``non_finite``, ``missing_output``; ``detail`` is a sentence for logs and
    ``explain`` (never the prompt)."""

    reason: str
    detail: str = ""


class ScoresNeeded(Exception):
    """Raised inside the (pure) engine when a rule that can still win needs ``scorer``'s
    scores and they were not given; the caller scores and decides again.

    ``available``: for a utility rule, the pool models whose backends this request may use
    (LatentRouter masks the others, which changes the scores of the rest); None: unmasked.
    The caller stores the scores under :attr:`key`.
    """

    def __init__(self, scorer: str, available: tuple[str, ...] | None = None) -> None:
        super().__init__(scorer, available)
        self.scorer = scorer
        self.available = available

    @property
    def key(self) -> str | tuple[str, tuple[str, ...]]:
        return score_key(self.scorer, self.available)


def score_key(scorer: str, available: tuple[str, ...] | None = None) -> str | tuple[str, tuple[str, ...]]:
    """Where one request's scores are kept: by scorer, and by the availability mask if any."""
    return scorer if available is None else (scorer, available)


class ScoringFailed(Exception):
    """Raised inside the engine when a needed scorer failed; the engine answers ``fallback``."""

    def __init__(self, scorer: str, failure: ScorerFailure) -> None:
        super().__init__(scorer, failure.reason)
        self.scorer = scorer
        self.failure = failure


class Scorer(abc.ABC):
    """A loaded scorer. Safe to call from many concurrent requests on one event loop."""

    spec: ScorerSpec

    @abc.abstractmethod
    async def score(
        self, request: RoutingRequest, *, deadline: float, available: Collection[str] | None = None
    ) -> Scores:
        """Score ``request``. ``deadline`` is an absolute ``time.monotonic()`` value; work that
        cannot finish by then should be abandoned. ``available`` (LatentRouter): the pool
        models this request may go to; the others are masked out and get no score (None:
        all). Raises :class:`ScorerError` on any failure (including a non-finite score); the
        caller also enforces the deadline."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release threads, channels and models. Called once the scorer is no longer used."""


@dataclass(frozen=True)
class ScorerDescription:
    """What a scorer's checkpoints say about it, read without torch (``policy check``).

    ``outputs``: the output names the scorer produces. ``backbones``: output -> a string
    identifying the backbone it was trained on (probes on one scorer must agree).
    ``thresholds``: output -> {large share -> calibrated threshold}. ``pool``: LatentRouter's
    pool model names (empty for probes). ``lambdas``: LatentRouter's {large share -> (λ
    calibrated for it, the pool model counted as large)}.
    """

    outputs: tuple[str, ...]
    backbones: Mapping[str, str] = field(default_factory=dict)
    thresholds: Mapping[str, Mapping[float, float]] = field(default_factory=dict)
    pool: tuple[str, ...] = ()
    lambdas: Mapping[float, tuple[float, str]] = field(default_factory=dict)


class ScorerLoader(Protocol):
    """What the ``switchyard.scorers`` entry point of a kind provides."""

    def describe(self, spec: ScorerSpec) -> ScorerDescription:
        """Read the spec's checkpoint configs (no torch); raise :class:`CheckpointError`
        naming the folder and the problem."""

    def load(self, spec: ScorerSpec) -> Scorer:
        """Load the model(s) (blocking; called off the event loop); raise
        :class:`CheckpointError` or :class:`ScorerError`."""
