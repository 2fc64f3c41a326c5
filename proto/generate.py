"""Compile switchyard's .proto files into the ``switchyard`` Python package (``make proto``).

    python proto/generate.py            # rewrite switchyard/, the repository's generated package
    python proto/generate.py --out DIR  # write DIR/switchyard/ instead (the staleness test)

The sources live under ``proto/`` and are compiled with ``-I proto``, so
``proto/switchyard/v1/scorer.proto`` (protobuf package ``switchyard.v1``) becomes the modules
``switchyard.v1.scorer_pb2`` and ``scorer_pb2_grpc`` in ``switchyard/v1/`` at the repository
root. That folder is importable under the same name from a checkout (``PYTHONPATH=$PWD``), an
editable install and a wheel, and the name belongs to this project: ``proto`` does not
(proto-plus, which every google-cloud library installs, owns the top-level ``proto`` package).

Beside the modules go a copy of each ``.proto`` (so the wheel ships the API's source) and each
folder's ``__init__.py``. ``switchyard/`` holds generated files only: any other file there is
removed. The output depends on the grpcio-tools version (it stamps the protobuf and grpcio
versions it needs at run time), which is why the ``dev`` extra pins it.

Needs grpcio-tools (the ``dev`` extra); nothing imports this script at run time.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

__all__ = ["PACKAGE", "PROTO_FILES", "PROTO_ROOT", "REPO_ROOT", "generate"]

#: The repository root: where the generated package is written by default.
REPO_ROOT = Path(__file__).resolve().parent.parent

#: The include path every .proto file is compiled against.
PROTO_ROOT = REPO_ROOT / "proto"

#: The .proto files compiled, relative to :data:`PROTO_ROOT`.
PROTO_FILES = ("switchyard/v1/scorer.proto",)

#: The generated top-level package (the protobuf packages' first component).
PACKAGE = "switchyard"


def generate(out: Path = REPO_ROOT) -> list[Path]:
    """Compile :data:`PROTO_FILES` into ``out/switchyard/``; return the files it holds afterwards."""
    try:
        from grpc_tools import protoc
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise SystemExit("proto/generate.py needs grpcio-tools: pip install 'switchyard[dev]'") from exc
    import importlib.resources

    well_known = str(importlib.resources.files("grpc_tools") / "_proto")
    out.mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *(str(PROTO_ROOT / proto) for proto in PROTO_FILES),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed; see the message above.")

    package = out / PACKAGE
    written: set[Path] = set()
    for proto in PROTO_FILES:
        copy = out / proto
        shutil.copyfile(PROTO_ROOT / proto, copy)
        written.add(copy)
        written.update(copy.parent.glob(Path(proto).stem + "_pb2*"))
    for folder in {folder for path in written for folder in path.parents if folder.is_relative_to(package)}:
        relative = folder.relative_to(out).as_posix()
        init = folder / "__init__.py"
        init.write_text(
            f'"""``{relative.replace("/", ".")}``: generated from ``proto/{relative}/`` '
            'by ``make proto`` (``proto/generate.py``); do not edit."""\n'
        )
        written.add(init)
    for leftover in sorted(package.rglob("*")):
        if leftover.is_file() and leftover not in written and "__pycache__" not in leftover.parts:
            leftover.unlink()
            print(f"removed {leftover}", file=sys.stderr)
    return sorted(written)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python proto/generate.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT, help="Output root (default: the repository).")
    args = parser.parse_args(argv)
    for path in generate(args.out.resolve()):
        print(path)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
