"""The generated code under proto/ is what `make proto` writes today, and imports cleanly."""

from __future__ import annotations

from proto.generate import PROTO_FILES, REPO_ROOT, generate


def test_generated_code_is_current(tmp_path):
    written = generate(tmp_path)
    assert {p.name for p in written} == {"scorer_pb2.py", "scorer_pb2.pyi", "scorer_pb2_grpc.py"}
    for fresh in written:
        checked_in = REPO_ROOT / fresh.relative_to(tmp_path)
        assert checked_in.exists(), f"{checked_in} is missing; run `make proto`."
        assert checked_in.read_text() == fresh.read_text(), f"{checked_in} is stale; run `make proto`."


def test_generated_modules_describe_the_service():
    from proto.switchyard.v1 import scorer_pb2, scorer_pb2_grpc

    service = scorer_pb2.DESCRIPTOR.services_by_name["ScorerService"]
    assert service.full_name == "switchyard.v1.ScorerService"
    assert {m.name for m in service.methods} == {"Score", "Describe"}
    assert hasattr(scorer_pb2_grpc, "ScorerServiceStub")
    assert all((REPO_ROOT / p).exists() for p in PROTO_FILES)
