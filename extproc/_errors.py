"""switchyard's exceptions.

One root, so callers can catch everything switchyard raises on purpose with one clause,
and library errors (grpc, yaml, torch) never leak unwrapped: they are re-raised as one of
these with ``raise ... from exc``.

    SwitchyardError
    ├── PolicyError          a policy file is invalid; carries every problem found
    ├── RequestError         a client request cannot be routed (bad JSON, too big, ...)
    │                        carries the HTTP status and an OpenAI-style error code
    ├── ScorerError          a learned scorer failed, timed out or returned a bad number
    │   ├── ScorerOverloaded refused at once: it could not answer within the deadline
    │   └── ScorerDeadline   no answer within the deadline (a remote call's DEADLINE_EXCEEDED)
    ├── CheckpointError      a probe / router checkpoint is missing, corrupt or mismatched
    └── EnvoyConfigError     an Envoy config cannot be rendered from the options given
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "SwitchyardError",
    "PolicyError",
    "PolicyProblem",
    "RequestError",
    "ScorerError",
    "ScorerOverloaded",
    "ScorerDeadline",
    "CheckpointError",
    "EnvoyConfigError",
    "scorer_message",
]


class SwitchyardError(Exception):
    """Root of every exception switchyard raises on purpose."""


@dataclass(frozen=True)
class PolicyProblem:
    """One problem in a policy file, located as ``file:line:column`` (1-based)."""

    path: str
    line: int
    column: int
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}:{self.column}: {self.message}"


class PolicyError(SwitchyardError):
    """A policy file is invalid. ``problems`` lists every problem, in file order."""

    def __init__(self, problems: list[PolicyProblem]) -> None:
        self.problems = sorted(problems, key=lambda p: (p.path, p.line, p.column))
        super().__init__("\n".join(str(p) for p in self.problems))


class RequestError(SwitchyardError):
    """A client request cannot be routed.

    ``status`` is the HTTP status Envoy returns to the client, ``code`` the OpenAI-style
    error code in the JSON error body, ``retry_after_s`` (whole seconds) the ``retry-after``
    header's value, when the client may try again later.
    """

    def __init__(self, message: str, *, status: int = 400, code: str = "invalid_request",
                 retry_after_s: int | None = None) -> None:
        self.status = status
        self.code = code
        self.retry_after_s = retry_after_s
        super().__init__(message)


class ScorerError(SwitchyardError):
    """A learned scorer failed, missed its deadline, or returned a non-finite score."""


class ScorerOverloaded(ScorerError):
    """A scorer refused a request at once, without running it: its queue is full, or the
    wait it predicts (the work queued ahead and this request, at its measured forward cost)
    is longer than the time left before the request's deadline. The policy's fallback
    applies, as for any scorer failure, with the reason ``overload``."""


class ScorerDeadline(ScorerError):
    """A scorer gave no answer within the request's deadline (e.g. a remote scorer's call
    ended DEADLINE_EXCEEDED). The policy's fallback applies with the reason ``deadline``."""


class CheckpointError(SwitchyardError):
    """A checkpoint folder is missing, corrupt, or does not match the backbone given."""


class EnvoyConfigError(SwitchyardError):
    """An Envoy config cannot be rendered: a bad address, a cluster without one, ..."""


def scorer_message(name: str, error: Exception | str, doing: str = "") -> str:
    """``Scorer 'name' <doing>: <error>``, or the error's message alone when it already starts
    by naming the scorer (a loader or a nested scorer named it), so no message says the name
    twice. Every layer that adds a scorer's name to a message goes through here."""
    message = str(error)
    for named in (f"Scorer {name!r}", f"Scorer `{name}`"):
        if message.lower().startswith(named.lower()):
            return named + message[len(named):]
    return f"Scorer {name!r}{' ' + doing if doing else ''}: {message}"
