"""Compile switchyard's .proto files into the Python modules beside them (``make proto``).

    python -m proto.generate            # rewrite proto/switchyard/v1/*_pb2*.py(i) in place
    python -m proto.generate --out DIR  # write the tree under DIR instead (the staleness test)

Files are compiled with ``-I <repo root>``, so ``proto/switchyard/v1/scorer.proto`` becomes
the importable module ``proto.switchyard.v1.scorer_pb2`` (and ``scorer_pb2_grpc``) from a
checkout and from an installed package alike. The output depends on the grpcio-tools
version (it stamps the protobuf and grpcio versions it needs at run time), which is why the
``dev`` extra pins it.

Needs grpcio-tools (the ``dev`` extra); nothing imports this module at run time.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["PROTO_FILES", "REPO_ROOT", "generate"]

#: The repository root: the include path every .proto file is compiled against.
REPO_ROOT = Path(__file__).resolve().parent.parent

#: The .proto files compiled, relative to :data:`REPO_ROOT`.
PROTO_FILES = ("proto/switchyard/v1/scorer.proto",)


def generate(out: Path = REPO_ROOT) -> list[Path]:
    """Compile :data:`PROTO_FILES` into ``out`` (the same relative layout); return the files written."""
    try:
        from grpc_tools import protoc
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise SystemExit("proto.generate needs grpcio-tools: pip install 'switchyard[dev]'") from exc
    import importlib.resources

    well_known = str(importlib.resources.files("grpc_tools") / "_proto")
    out.mkdir(parents=True, exist_ok=True)
    for proto in PROTO_FILES:
        args = [
            "grpc_tools.protoc",
            f"-I{REPO_ROOT}",
            f"-I{well_known}",
            f"--python_out={out}",
            f"--pyi_out={out}",
            f"--grpc_python_out={out}",
            str(REPO_ROOT / proto),
        ]
        if protoc.main(args) != 0:
            raise SystemExit(f"protoc failed on {proto}; see the message above.")
    return sorted(p for proto in PROTO_FILES for p in (out / proto).parent.glob(Path(proto).stem + "_pb2*"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m proto.generate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT, help="Output root (default: the repository).")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
