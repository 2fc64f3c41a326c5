"""The `switchyard` CLI: explain, schema, serve (real processes for serve)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from extproc.cli import main
from tests.extproc.conftest import POLICIES, REPO, chat


def explain(tmp_path, capsys, body, *args):
    request = tmp_path / "body.json"
    request.write_bytes(body if isinstance(body, bytes) else json.dumps(body).encode())
    code = main(["policy", "explain", str(POLICIES / "default.yaml"), "--request", str(request), *args])
    return code, json.loads(capsys.readouterr().out)


def test_explain_prints_the_decision_and_the_evaluated_signals(tmp_path, capsys):
    code, out = explain(tmp_path, capsys, chat("Please prove this theorem about primes"))
    assert code == 0
    assert {k: out[k] for k in ("backend", "cluster", "model", "rule")} == {
        "backend": "large", "cluster": "large", "model": "large-model", "rule": "maths-reasoning"}
    assert out["signals"]["maths"] == {"matched": True, "value": ["prove", "theorem"]}
    assert out["signals"]["has_image"] == {"matched": False, "value": 0}
    assert "short_prompt" not in out["signals"]  # the code rule's `all` stopped before it


def test_explain_takes_headers(tmp_path, capsys):
    policy = POLICIES / "examples" / "tenant-tiers.yaml"
    request = tmp_path / "b.json"
    request.write_text(json.dumps(chat("hello")))
    assert main(["policy", "explain", str(policy), "--request", str(request), "--header", "X-Tenant-Tier=enterprise"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["backend"], out["rule"], out["tenant"]) == ("large", "enterprise-default", "enterprise")


def test_explain_reports_request_errors_as_json(tmp_path, capsys):
    code, out = explain(tmp_path, capsys, b"[1]")
    assert code == 2 and out["error"]["status"] == 400 and out["error"]["code"] == "invalid_body"


def test_schema_file_and_policy_reference_page_match_the_declaration(capsys):
    assert main(["policy", "schema"]) == 0
    assert (REPO / "policies" / "policy.schema.json").read_text() == capsys.readouterr().out
    assert main(["policy", "schema", "--markdown"]) == 0
    assert capsys.readouterr().out in (REPO / "docs" / "policy-reference.md").read_text()


def _commands_and_options(parser, path=("switchyard",)):
    """Every (command path, long option) of the parser, subcommands walked depth first."""
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield (*path, name), None
                yield from _commands_and_options(child, (*path, name))
        elif not isinstance(action, argparse._HelpAction):
            for option in action.option_strings:
                if option.startswith("--"):
                    yield path, option


def test_cli_reference_page_names_every_command_and_option():
    """docs/cli.md names every subcommand (in a heading or table as `switchyard a b`) and, in
    that command's section, every long option, the learned-scorer commands included."""
    from extproc.cli import build_parser

    page = (REPO / "docs" / "cli.md").read_text()
    sections = {}
    for block in page.split("\n### ")[1:]:
        title, _, body = block.partition("\n")
        sections[title.strip().strip("`")] = body
    missing = []
    for path, option in _commands_and_options(build_parser(with_routers=True)):
        command = " ".join(path)
        if option is None:
            if f"`{command}" not in page:
                missing.append(command)
        elif not re.search(rf"`{re.escape(option)}(?![\w-])", sections.get(command, "")):
            missing.append(f"{command} {option}")
    assert len(list(_commands_and_options(build_parser(with_routers=True)))) > 100
    assert not missing, f"docs/cli.md does not document: {missing}"


def test_policies_validate_against_the_json_schema():
    import jsonschema
    import yaml

    schema = json.loads((REPO / "policies" / "policy.schema.json").read_text())
    for path in [POLICIES / "default.yaml", *(POLICIES / "examples").glob("*.yaml")]:
        jsonschema.validate(yaml.safe_load(path.read_text()), schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"version": 1, "backends": {}, "default": "a", "bogus": 1}, schema)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _health(port: int) -> int | None:
    """The ext_proc service's health status, or None when the server refuses the call."""
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            return health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="envoy.service.ext_proc.v3.ExternalProcessor"), timeout=1).status
    except grpc.RpcError:
        return None


def _wait_serving(port: int, deadline: float = 20.0) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        try:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                reply = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service="envoy.service.ext_proc.v3.ExternalProcessor"), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
        except grpc.RpcError:
            time.sleep(0.1)
    raise AssertionError(f"switchyard on port {port} never became healthy")


@pytest.mark.parametrize("workers", [1, 2])
def test_serve_reports_healthy_and_stops_cleanly_on_sigterm(workers):
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "extproc", "serve", "--policy", str(POLICIES / "default.yaml"),
         "--listen", f"127.0.0.1:{port}", "--workers", str(workers), "--grace", "1", "--drain-seconds", "0"],
        cwd=REPO, stderr=subprocess.PIPE, text=True,
    )
    try:
        _wait_serving(port)
        if workers == 2:
            children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
            assert len(children) == 2
        proc.terminate()
        assert proc.wait(timeout=15) == 0
        assert proc.stderr.read().count("switchyard: serving on") == workers
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.parametrize(("workers", "how"), [(1, "sigterm"), (2, "sigterm"), (1, "ctrl-c"), (2, "ctrl-c")])
def test_serve_drains_until_the_drain_ends_or_a_second_signal(workers, how):
    """After the first signal every worker answers NOT_SERVING and keeps taking calls; the
    second one ends the drain at once. A terminal's Ctrl-C (SIGINT to the whole process
    group, parent and workers) counts once."""
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "extproc", "serve", "--policy", str(POLICIES / "default.yaml"),
         "--listen", f"127.0.0.1:{port}", "--workers", str(workers), "--grace", "1", "--drain-seconds", "120"],
        cwd=REPO, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )

    def stop_signal() -> None:
        if how == "ctrl-c":
            os.killpg(proc.pid, signal.SIGINT)
        else:
            proc.send_signal(signal.SIGTERM)

    try:
        _wait_serving(port)
        stop_signal()
        deadline = time.monotonic() + 10
        while _health(port) != health_pb2.HealthCheckResponse.NOT_SERVING:
            assert time.monotonic() < deadline and proc.poll() is None, "never turned NOT_SERVING"
            time.sleep(0.05)
        time.sleep(0.5)
        # Each new connection may reach another worker (SO_REUSEPORT): all drain, none refuses.
        assert [_health(port) for _ in range(4 * workers)] == [health_pb2.HealthCheckResponse.NOT_SERVING] * 4 * workers
        assert proc.poll() is None, "still draining"
        stop_signal()
        assert proc.wait(timeout=20) == 0  # far sooner than the 120 s drain
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    events = [json.loads(line) for line in proc.stderr.read().splitlines() if line.startswith("{")]
    drains = [(e["event"], e.get("drain_s"), e.get("cut_short")) for e in events if "drain" in e["event"]]
    assert sorted(drains) == sorted([("draining", 120, None), ("drain ended", None, True)] * workers)


@pytest.mark.parametrize("option", ["--drain-seconds", "--grace"])
@pytest.mark.parametrize("value", ["-1", "nan", "inf"])
def test_serve_refuses_a_bad_number_of_seconds(option, value, capsys):
    assert main(["serve", "--policy", str(POLICIES / "default.yaml"), option, value]) == 1
    assert f"switchyard: {option} must be a number of seconds >= 0, got {float(value)}." in capsys.readouterr().err


def test_serve_refuses_a_bad_policy(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nbackends: {}\n")
    result = subprocess.run([sys.executable, "-m", "extproc", "serve", "--policy", str(bad)],
                            cwd=REPO, capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert f"{bad}:" in result.stderr and "`default` is required" in result.stderr


def test_extproc_imports_and_serves_without_torch():
    """`extproc` must never import torch, transformers, peft or routers."""
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'transformers', 'peft', 'routers'):\n"
        "            raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import extproc, extproc.cli, extproc.server._serve\n"
        "from extproc.cli import main\n"
        "assert main(['policy', 'check', 'policies/default.yaml']) == 0\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("ok")


def test_exported_names():
    import extproc

    assert sorted(extproc.__all__) == sorted(
        ["Backend", "CheckpointError", "Decision", "EnvoyConfigError", "ExternalProcessor", "Policy", "PolicyEngine", "PolicyError",
         "PolicyProblem", "RequestError", "Rule", "RoutingRequest", "ScorerError", "ScorerOverloaded", "ScorerDeadline",
         "SwitchyardError",
         "conversation_text", "image_urls", "last_user_text", "load_policy", "message_text", "parse_json_body",
         "parse_policy", "scorer_message", "compose_yaml",
         # learned scorers: the interface routers implements
         "BatchConfig", "ImageLimits", "RemoteConfig", "RemoteTls", "Scorer", "ScorerDescription", "ScorerFailure",
         "ScorerLoader",
         "ScorerSpec", "Scores", "describe_scorer", "load_scorer", "read_scorer_specs",
         # the YAML schema machinery (routers.labelling's config)
         "Obj", "Key", "MapOf", "Str", "Int", "Num", "Bool", "Validation",
         # declared once here, used by routers too
         "DEFAULT_GRACE_S", "LEARNED_COMMANDS", "ML_INSTALL_HINT", "lazy_exports", "pem_problem", "score_within"]
    )
    assert all(hasattr(extproc, name) for name in extproc.__all__)


@pytest.mark.parametrize("argv", [["--log-level", "debug", "train", "--help"], ["--log-level=debug", "train", "--help"],
                                  ["train", "--help"]])
def test_a_learned_scorer_command_is_found_after_the_log_level(argv, capsys):
    """`switchyard --log-level debug train ...` used to take `debug` for the command and
    answered "invalid choice: 'train'"."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 0 and "probe" in capsys.readouterr().out
