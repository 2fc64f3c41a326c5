"""``switchyard scorer serve`` as a user runs it: a real process with a probe checkpoint
trained here on a tiny model, scored remotely exactly as in process; bad configs exit 1."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from extproc import RemoteConfig, RemoteTls, RoutingRequest, ScorerError, ScorerSpec, load_scorer, read_scorer_specs
from extproc.cli import main
from tests.remote.support import REPO


def test_a_bad_config_exits_1_naming_the_problem(tmp_path, capsys):
    config = tmp_path / "scorers.yaml"
    config.write_text("scorers:\n  probe:\n    kind: probe\n    checkpoints: {relope: ckpt/missing}\n")
    assert main(["scorer", "serve", "--config", str(config), "--listen", "127.0.0.1:0"]) == 1
    err = capsys.readouterr().err
    assert f"{config}:4:" in err and "does not exist" in err

    assert main(["scorer", "serve", "--config", str(tmp_path / "nope.yaml"), "--listen", "127.0.0.1:0"]) == 1
    assert "nope.yaml" in capsys.readouterr().err

    config.write_text("scorers:\n  probe:\n    kind: probe\n    remote: {target: 'dns:///elsewhere:50061'}\n")
    assert main(["scorer", "serve", "--config", str(config), "--listen", "127.0.0.1:0"]) == 1
    assert "remote" in capsys.readouterr().err


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from tests.routers.test_probe_support import tiny_text_model, trigger_set, write_jsonl

    root = tmp_path_factory.mktemp("served")
    model = tiny_text_model(root)
    data = write_jsonl(root / "train.jsonl", trigger_set(32, 1))
    out = root / "ckpt"
    code = main(["train", "probe", "--method", "last_token", "--backbone", str(model), "--data", str(data),
                 "--val", str(data), "--small", "small", "--out", str(out), "--epochs", "2", "--no-progress"])
    assert code == 0
    return out


def _start(config, listen="127.0.0.1:0", *flags: str):
    proc = subprocess.Popen(
        [sys.executable, "-m", "extproc", "scorer", "serve", "--config", str(config), "--listen", listen, *flags],
        cwd=REPO, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"},
    )
    lines = []
    for line in proc.stderr:  # JSON logs, then the one plain line saying where it serves
        lines.append(line)
        found = re.match(r"switchyard: serving scorers (.+) on (\S+):(\d+)$", line.strip())
        if found:
            return proc, int(found.group(3))
    proc.wait(timeout=30)
    proc.stderr.close()
    raise AssertionError(f"scorer serve exited {proc.returncode} without serving:\n{''.join(lines)}")


@contextlib.contextmanager
def _serving(config, *flags: str):
    """``scorer serve`` on a free port: ``(process, port)``; SIGTERM when the block ends (the
    exit code is the test's to check), killed if it is still running after that."""
    proc, port = _start(config, "127.0.0.1:0", *flags)
    try:
        yield proc, port
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()


def test_serve_answers_health_and_scores_as_in_process(checkpoint, tmp_path):
    config = tmp_path / "scorers.yaml"
    config.write_text(f"scorers:\n  probe:\n    kind: probe\n    checkpoints: {{small_ok: {checkpoint}}}\n"
                      f"    batch: {{max_size: 8, max_wait_ms: 2}}\n")
    requests = [RoutingRequest.from_json({"messages": [{"role": "user", "content": text}]})
                for text in ("what is two plus two", "write a proof of the four colour theorem", "hi")]
    with _serving(config) as (proc, port):
        local_spec = read_scorer_specs(config)["probe"]
        remote_spec = ScorerSpec(name="probe", kind="probe", remote=RemoteConfig(target=f"127.0.0.1:{port}"))

        async def score_both():
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            remote, local = load_scorer(remote_spec), await asyncio.to_thread(load_scorer, local_spec)
            try:
                far = [await remote.score(r, deadline=time.monotonic() + 10) for r in requests]
                near = [await local.score(r, deadline=time.monotonic() + 10) for r in requests]
            finally:
                await remote.close()
                await local.close()
            return health.status, far, near

        status, far, near = asyncio.run(score_both())
        assert status == health_pb2.HealthCheckResponse.SERVING
        for got, want in zip(far, near):
            assert set(got.values) == {"small_ok"}
            assert got.values["small_ok"] == pytest.approx(want.values["small_ok"], abs=1e-5)
            assert 0.0 < got.values["small_ok"] < 1.0 and got.batch_size >= 1
        assert len({round(s.values["small_ok"], 6) for s in far}) > 1  # the requests are told apart

    assert proc.returncode == 0  # stopped by SIGTERM: a clean exit


def test_serve_with_tls_flags_answers_health_and_scores_over_mutual_tls(checkpoint, tmp_path):
    from tests.remote.certs import SERVER_NAME, make_certs

    certs = make_certs(tmp_path)
    config = tmp_path / "scorers.yaml"
    config.write_text(f"scorers:\n  probe:\n    kind: probe\n    checkpoints: {{small_ok: {checkpoint}}}\n")
    with _serving(config, "--tls-cert", str(certs.server_cert), "--tls-key", str(certs.server_key),
                  "--tls-client-ca", str(certs.ca)) as (proc, port):
        tls = RemoteTls(ca=str(certs.ca), cert=str(certs.client_cert), key=str(certs.client_key),
                        server_name=SERVER_NAME)

        async def check():
            credentials = grpc.ssl_channel_credentials(certs.ca.read_bytes(), certs.client_key.read_bytes(),
                                                       certs.client_cert.read_bytes())
            async with grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials,
                                               options=[("grpc.ssl_target_name_override", SERVER_NAME)]) as channel:
                health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            remote = load_scorer(ScorerSpec(name="probe", kind="probe",
                                            remote=RemoteConfig(target=f"127.0.0.1:{port}", tls=tls)))
            plain = load_scorer(ScorerSpec(name="probe", kind="probe", remote=RemoteConfig(target=f"127.0.0.1:{port}")))
            request = RoutingRequest.from_json({"messages": [{"role": "user", "content": "what is two plus two"}]})
            try:
                scores = await remote.score(request, deadline=time.monotonic() + 10)
                with pytest.raises(ScorerError):
                    await plain.score(request, deadline=time.monotonic() + 10)
            finally:
                await remote.close()
                await plain.close()
            return health.status, scores

        status, scores = asyncio.run(check())
        assert status == health_pb2.HealthCheckResponse.SERVING
        assert 0.0 < scores.values["small_ok"] < 1.0
    assert proc.returncode == 0  # stopped by SIGTERM: a clean exit


@pytest.mark.parametrize("extra", ["    fallback: large\n", "    breaker: {failures: 2}\n"])
def test_a_scorers_file_refuses_the_sidecar_only_keys_at_their_line(tmp_path, extra):
    """`fallback` and `breaker` decide what a sidecar does when its scorer fails; a scorer
    service would silently ignore them, so its config refuses them."""
    from extproc import PolicyError

    config = tmp_path / "scorers.yaml"
    config.write_text("scorers:\n  probe:\n    kind: probe\n    checkpoints: {small_ok: /nowhere}\n" + extra)
    with pytest.raises(PolicyError) as info:
        read_scorer_specs(config)
    key = extra.split(":")[0].strip()
    [problem] = [p for p in info.value.problems if "no effect in a scorer service" in p.message]
    assert problem.line == 5 and f"`scorers.probe.{key}`" in problem.message
