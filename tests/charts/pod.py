"""Run a rendered pod's containers as local processes, the way the kubelet would start them.

Each volume becomes a directory under ``root``: a ConfigMap's or Secret's data is written in
the kubelet's atomic-writer layout (``KEY -> ..data/KEY``, ``..data -> ..<timestamp>``, and
an update swaps ``..data`` with one rename), an emptyDir starts empty. Every mount path in a
container's command and args (and in its preStop hook's command) is rewritten to its
directory; ``switchyard``, ``envoy`` and ``python`` become the binaries of this environment.
Nothing else of the manifest is changed.

The pod's address is :data:`POD_IP`, where the kubelet's probes and other pods connect: a
server bound to 0.0.0.0 answers there, one bound to the pod's loopback (127.0.0.1) does not,
as in a real pod.
"""

from __future__ import annotations

import http.client
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from harness import Child, envoy_binary

__all__ = ["POD_IP", "LocalPod", "atomic_write", "reachable"]

#: The pod's own address, as seen from outside it. Linux routes all of 127.0.0.0/8 to the
#: loopback interface, but a socket bound to 127.0.0.1 answers only there: so here, as from
#: outside a real pod, 127.0.0.2 reaches what listens on 0.0.0.0 and nothing on 127.0.0.1.
POD_IP = "127.0.0.2"
#: Seconds a probe's command may take here (a busy test machine starts Python slowly).
PROBE_TIMEOUT_S = 30


def reachable(host: str, port: int) -> bool:
    """True when a TCP connection to ``host:port`` opens."""
    try:
        socket.create_connection((host, port), timeout=2).close()
        return True
    except OSError:
        return False


def atomic_write(directory: Path, data: dict[str, str]) -> None:
    """Write ``data`` (file name -> text) into ``directory`` as the kubelet does, or update it."""
    directory.mkdir(parents=True, exist_ok=True)
    stamp = directory / f"..{time.time_ns()}"
    stamp.mkdir()
    for key, text in data.items():
        (stamp / key).write_text(text)
    tmp = directory / "..data_tmp"
    tmp.symlink_to(stamp.name)
    old = os.readlink(directory / "..data") if (directory / "..data").is_symlink() else None
    os.replace(tmp, directory / "..data")  # the one atomic step
    for key in data:
        if not (directory / key).is_symlink():
            (directory / key).symlink_to(f"..data/{key}")
    if old:
        shutil.rmtree(directory / old)


class LocalPod:
    """The pod spec of a Deployment, its volumes as directories under ``root``."""

    def __init__(self, deployment: dict[str, Any], manifests: list[dict[str, Any]], root: Path,
                 secrets: dict[str, dict[str, str]] | None = None,
                 config_maps: dict[str, dict[str, str]] | None = None) -> None:
        self.spec = deployment["spec"]["template"]["spec"]
        self.root = root
        self.volumes: dict[str, Path] = {}
        rendered_maps = {m["metadata"]["name"]: m.get("data", {}) for m in manifests if m["kind"] == "ConfigMap"}
        for volume in self.spec.get("volumes", []):
            path = root / "volumes" / volume["name"]
            if "configMap" in volume:
                name = volume["configMap"]["name"]
                data = (config_maps or {}).get(name, rendered_maps.get(name))
                assert data is not None, f"ConfigMap {name} is neither rendered nor given"
                atomic_write(path, data)
            elif "secret" in volume:
                name = volume["secret"]["secretName"]
                data = (secrets or {})[name]
                items = volume["secret"].get("items")
                atomic_write(path, {i["path"]: data[i["key"]] for i in items} if items else data)
            elif "emptyDir" in volume:
                path.mkdir(parents=True)
            else:
                raise AssertionError(f"volume kind not supported here: {volume}")
            self.volumes[volume["name"]] = path

    def container(self, name: str) -> dict[str, Any]:
        for container in self.spec.get("initContainers", []) + self.spec["containers"]:
            if container["name"] == name:
                return container
        raise AssertionError(f"no container {name}")

    def mounts(self) -> list[tuple[str, Path]]:
        """Mount path -> directory, for the whole pod (longest path first).

        Pod-wide, because a path one container writes (the init container renders the Envoy
        config naming /etc/switchyard/credentials/...) is read in another container that
        mounts it; no two containers here mount different volumes at one path (checked).
        """
        seen: dict[str, Path] = {}
        for container in self.spec.get("initContainers", []) + self.spec["containers"]:
            for mount in container.get("volumeMounts", []):
                local = self.volumes[mount["name"]]
                assert seen.setdefault(mount["mountPath"], local) == local, f"{mount['mountPath']} mounts two volumes"
        return sorted(seen.items(), key=lambda item: -len(item[0]))

    def argv(self, name: str) -> list[str]:
        """The container's command + args, mount paths rewritten, binaries resolved."""
        container = self.container(name)
        return self._local([*container.get("command", []), *container.get("args", [])])

    def _local(self, argv: list[Any]) -> list[str]:
        mounts = dict(self.mounts())
        # One pass: a mount path where a path starts (after start, "=" or ":"), up to a "/" or the end.
        pattern = re.compile(r"(?<![^=:])(" + "|".join(re.escape(m) for m in mounts) + r")(?=/|$)")
        argv = [pattern.sub(lambda match: str(mounts[match.group(1)]), str(arg)) for arg in argv]
        binaries = {"switchyard": str(Path(sys.executable).parent / "switchyard"), "envoy": envoy_binary(),
                    "python": sys.executable}
        argv[0] = binaries.get(argv[0], argv[0])
        return argv

    def pre_stop(self, name: str) -> subprocess.Popen | None:
        """Start the container's preStop hook (an ``exec`` command) as a local process, as the
        kubelet runs it when the pod stops; ``None`` when the container has none."""
        hook = (self.container(name).get("lifecycle") or {}).get("preStop")
        if hook is None:
            return None
        assert list(hook) == ["exec"], f"only exec hooks run here: {hook}"
        return subprocess.Popen(self._local(hook["exec"]["command"]), cwd=self.root, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def run(self, name: str, timeout: float = 60) -> subprocess.CompletedProcess:
        """Run a (init) container to completion."""
        return subprocess.run(self.argv(name), capture_output=True, text=True, timeout=timeout, cwd=self.root)

    def start(self, name: str) -> Child:
        return Child(name, self.argv(name), self.root / f"{name}.log").start()

    def probe(self, name: str, kind: str = "readinessProbe") -> bool:
        """Run the container's probe once, as the kubelet does: an ``exec`` command inside the
        container (here: a local process), or ``httpGet`` / ``grpc`` / ``tcpSocket`` to the
        pod's address (:data:`POD_IP`). True when it succeeds."""
        probe = self.container(name)[kind]
        if "exec" in probe:
            try:
                done = subprocess.run(self._local(probe["exec"]["command"]), capture_output=True, cwd=self.root,
                                      timeout=PROBE_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                return False
            return done.returncode == 0
        if "httpGet" in probe:
            get = probe["httpGet"]
            conn = http.client.HTTPConnection(POD_IP, self.port(name, get["port"]), timeout=2)
            try:
                conn.request("GET", get["path"])
                return 200 <= conn.getresponse().status < 400
            except OSError:
                return False
            finally:
                conn.close()
        if "grpc" in probe:
            return _grpc_serving(f"{POD_IP}:{probe['grpc']['port']}", probe["grpc"].get("service", ""))
        if "tcpSocket" in probe:
            return reachable(POD_IP, self.port(name, probe["tcpSocket"]["port"]))
        raise AssertionError(f"probe kind not supported here: {probe}")

    def port(self, container: str, name_or_number: str | int) -> int:
        if isinstance(name_or_number, int):
            return name_or_number
        return next(p["containerPort"] for p in self.container(container)["ports"] if p["name"] == name_or_number)


def _grpc_serving(target: str, service: str) -> bool:
    """The kubelet's gRPC probe: the health service at ``target`` says SERVING."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(target) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING
