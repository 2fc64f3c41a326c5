"""Redis URLs: which ones a policy may name, and how they are shown (never with a password)."""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

__all__ = ["SCHEMES", "redact_url", "url_problem", "without_password"]

#: The URL schemes redis-py connects with: TCP, TLS and a Unix socket.
SCHEMES = ("redis", "rediss", "unix")


def redact_url(url: str) -> str:
    """``url`` with its password (if any) replaced by ``***``, for logs, reprs and errors."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return "<unparsable URL>"
    query = parse_qsl(parts.query, keep_blank_values=True)
    secret_query = any(name == "password" for name, _ in query)  # redis-py also reads `?password=`
    if password is None and not secret_query:
        return url  # unchanged (urlunsplit would rewrite `unix:///path` as `unix:/path`)
    if password is not None:
        user = parts.username or ""
        parts = parts._replace(netloc=f"{user}:***@{parts.netloc.rpartition('@')[2]}")
    if secret_query:
        query = [(name, "***" if name == "password" else value) for name, value in query]
        parts = parts._replace(query=urlencode(query, safe="*"))
    return urlunsplit(parts)


def url_problem(url: str) -> str | None:
    """What is wrong with ``url`` as a Redis URL (a sentence fragment), or ``None``.

    Checked without connecting: the scheme, a host for TCP and TLS, a numeric port and
    database, a socket path for ``unix://``.
    """
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        return f"is not a URL ({exc})"
    if parts.scheme not in SCHEMES:
        return f"must start with {', '.join(s + '://' for s in SCHEMES)}"
    if parts.scheme == "unix":
        return None if parts.path else "names no socket path (unix:///path/to/redis.sock)"
    if not parts.hostname:
        return "names no host (redis://host:6379/0)"
    if port == 0:
        return "names port 0"
    database = parts.path.lstrip("/")
    if database and not database.isdigit():
        return f"names database {database!r}; a database is a number (redis://host:6379/0)"
    return None


def without_password(url: str) -> str:
    """``url`` with no password in it (user and ``?password=`` dropped from it), for a password
    given apart: redis-py lets a URL's password win over the one passed beside it."""
    parts = urlsplit(url)
    query = [(name, value) for name, value in parse_qsl(parts.query, keep_blank_values=True) if name != "password"]
    if parts.password is None and len(query) == len(parse_qsl(parts.query, keep_blank_values=True)):
        return url
    host = parts.netloc.rpartition("@")[2]
    netloc = f"{parts.username}@{host}" if parts.username else host
    return urlunsplit(parts._replace(netloc=netloc, query=urlencode(query)))
