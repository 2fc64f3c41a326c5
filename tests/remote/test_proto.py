"""The package generated from proto/ is what `make proto` writes today, imports cleanly, and
ships as `switchyard`: never as a top-level `proto`, which proto-plus owns."""

from __future__ import annotations

import os
import shlex
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _tree(root: Path) -> dict[str, str]:
    return {
        path.relative_to(root).as_posix(): path.read_text()
        for path in sorted(root.rglob("*"))
        if path.is_file() and "__pycache__" not in path.parts
    }


def test_generated_code_is_current(tmp_path):
    # The command `make proto` runs, writing into tmp_path instead of the checkout.
    subprocess.run([sys.executable, "proto/generate.py", "--out", str(tmp_path)], cwd=REPO, check=True,
                   capture_output=True)
    fresh, checked_in = _tree(tmp_path / "switchyard"), _tree(REPO / "switchyard")
    assert set(fresh) >= {"v1/scorer.proto", "v1/scorer_pb2.py", "v1/scorer_pb2.pyi", "v1/scorer_pb2_grpc.py"}
    assert set(checked_in) == set(fresh), "switchyard/ holds other files than `make proto` writes; run `make proto`."
    for name, text in fresh.items():
        assert checked_in[name] == text, f"switchyard/{name} is stale; edit proto/, then run `make proto`."


def test_generated_modules_describe_the_service():
    from switchyard.v1 import scorer_pb2, scorer_pb2_grpc

    assert scorer_pb2.DESCRIPTOR.name == "switchyard/v1/scorer.proto"
    service = scorer_pb2.DESCRIPTOR.services_by_name["ScorerService"]
    assert service.full_name == "switchyard.v1.ScorerService"
    assert {m.name for m in service.methods} == {"Score", "Describe"}
    assert hasattr(scorer_pb2_grpc, "ScorerServiceStub")
    assert (REPO / "proto" / scorer_pb2.DESCRIPTOR.name).is_file()


def _docker_sources() -> set[str]:
    """The files and folders the Dockerfile copies into the image before `pip install .`."""
    sources = set()
    for line in (REPO / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY "):
            sources.update(shlex.split(line)[1:-1])
    return sources


def test_wheel_ships_switchyard_and_no_proto_package(tmp_path):
    # Build from a copy of the checkout (what `pip install .` sees), leaving the checkout untouched.
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns(".*", "__pycache__", "build", "dist", "*.egg-info")
    shutil.copytree(REPO, src, ignore=ignore)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(tmp_path / "dist"),
                    str(src)], check=True, capture_output=True)
    [wheel] = (tmp_path / "dist").glob("switchyard-*.whl")

    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top_level == {"extproc", "routers", "switchyard"}
    generated = ("__init__.py", "v1/__init__.py", "v1/scorer.proto", "v1/scorer_pb2.py", "v1/scorer_pb2.pyi",
                 "v1/scorer_pb2_grpc.py")
    assert {f"switchyard/{name}" for name in generated} <= set(names)
    # The image's `pip install .` needs every package's folder (and the project's metadata).
    assert top_level | {"pyproject.toml", "README.md"} <= _docker_sources()

    # Installed on its own (no checkout on sys.path), the wheel serves the generated code, and
    # a `proto` package some other distribution (proto-plus) installs beside it stays that one's.
    target = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--no-index", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    (target / "proto").mkdir()
    (target / "proto" / "__init__.py").write_text('OWNER = "proto-plus"\n')
    check = (
        "import proto, switchyard.v1.scorer_pb2_grpc as grpc_code\n"
        f"assert grpc_code.__file__.startswith({str(target)!r}), grpc_code.__file__\n"
        "assert proto.OWNER == 'proto-plus'\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), *site.getsitepackages()])}
    # -S: no site hooks, so neither the editable install's finder nor the checkout is seen.
    subprocess.run([sys.executable, "-S", "-c", check], cwd=tmp_path, env=env, check=True)
