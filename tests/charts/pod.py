"""Run a rendered pod's containers as local processes, the way the kubelet would start them.

Each volume becomes a directory under ``root``: a ConfigMap's or Secret's data is written in
the kubelet's atomic-writer layout (``KEY -> ..data/KEY``, ``..data -> ..<timestamp>``, and
an update swaps ``..data`` with one rename), an emptyDir starts empty. Every mount path in a
container's command and args (and in its preStop hook's command) is rewritten to its
directory; ``switchyard`` and ``envoy`` become the binaries of this environment. Nothing
else of the manifest is changed.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from demo.stack import Child, envoy_binary

__all__ = ["LocalPod", "atomic_write"]


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
        binaries = {"switchyard": str(Path(sys.executable).parent / "switchyard"), "envoy": envoy_binary()}
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

    def port(self, container: str, name_or_number: str | int) -> int:
        if isinstance(name_or_number, int):
            return name_or_number
        return next(p["containerPort"] for p in self.container(container)["ports"] if p["name"] == name_or_number)
