"""Learned scorers as the policy sees them: a spec from the policy, and an async ``score``.

``extproc`` defines the interface and stays torch-free; ``routers`` implements the
in-process scorers (probes on a shared backbone prefill, LatentRouter) behind a
micro-batcher, and ``extproc._remote_scorer`` implements the gRPC client for
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
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from extproc._request import RoutingRequest

__all__ = [
    "SCORER_KINDS",
    "BatchConfig",
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
]

#: The ``kind`` values of ``scorers.<name>``.
SCORER_KINDS = ("probe", "latent_router")


@dataclass(frozen=True)
class BatchConfig:
    """How the in-process micro-batcher groups requests into one forward."""

    max_size: int = 32
    max_wait_ms: float = 4.0


@dataclass(frozen=True)
class ImageLimits:
    """What an in-process scorer accepts of ``image_url`` parts.

    ``data:`` URLs are decoded under ``max_bytes`` (encoded size) and ``max_pixels``
    (width × height; a decompression bomb is refused before it is decoded). http(s) URLs
    are fetched only from ``allow_hosts`` (exact host names; empty: never fetched), within
    ``fetch_timeout_ms`` and ``max_bytes``. A refused or broken image is a scorer failure,
    so the policy takes its fallback.
    """

    max_bytes: int = 10 * 1024 * 1024
    max_pixels: int = 40_000_000
    allow_hosts: tuple[str, ...] = ()
    fetch_timeout_ms: float = 2000.0


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
    - ``fingerprint``: the checkpoint files' identity (sizes and mtimes) when the spec was
      built, so a checkpoint replaced in place loads as a new scorer on reload.
    """

    name: str
    kind: str
    checkpoints: tuple[tuple[str, str], ...] = ()
    checkpoint: str | None = None
    backends: tuple[tuple[str, str], ...] = ()
    device: str = "cpu"
    dtype: str | None = None
    batch: BatchConfig = field(default_factory=BatchConfig)
    deadline_ms: float = 80.0
    images: ImageLimits = field(default_factory=ImageLimits)
    remote: RemoteConfig | None = None
    fingerprint: str = ""

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


@dataclass(frozen=True)
class ScorerFailure:
    """Why a scorer gave no usable scores for a request: ``reason`` is one of ``deadline``,
    ``error``, ``non_finite``, ``missing_output``; ``detail`` is a sentence for logs and
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
    pool model names (empty for probes).
    """

    outputs: tuple[str, ...]
    backbones: Mapping[str, str] = field(default_factory=dict)
    thresholds: Mapping[str, Mapping[float, float]] = field(default_factory=dict)
    pool: tuple[str, ...] = ()


class ScorerLoader(Protocol):
    """What the ``switchyard.scorers`` entry point of a kind provides."""

    def describe(self, spec: ScorerSpec) -> ScorerDescription:
        """Read the spec's checkpoint configs (no torch); raise :class:`CheckpointError`
        naming the folder and the problem."""

    def load(self, spec: ScorerSpec) -> Scorer:
        """Load the model(s) (blocking; called off the event loop); raise
        :class:`CheckpointError` or :class:`ScorerError`."""
