"""TLS and mutual TLS between the remote scorer client and ``switchyard scorer serve``, over
real gRPC on loopback with certificates made here: what works scores, every TLS failure is a
ScorerError (so the policy takes its fallback), and a policy naming a TLS file that is not
there is rejected at the key, with its line and column."""

from __future__ import annotations

import asyncio
import time

import pytest

from extproc import PolicyError, RemoteTls, ScorerError
from extproc.server._reload import PolicyFile
from extproc.scoring._remote import RemoteScorer, _channels
from extproc.cli import main
from routers.serving.remote_server import ServerTls
from tests.remote.certs import SERVER_NAME, Certs, make_certs, renewed_server
from tests.remote.support import FakeScorer, remote_spec, request, serving, spec


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


def run(coro):
    return asyncio.run(coro)


def soon(seconds: float = 5.0) -> float:
    return time.monotonic() + seconds


def client_tls(certs: Certs, *, ca=None, mutual: bool = False) -> RemoteTls:
    return RemoteTls(ca=str(ca or certs.ca), cert=str(certs.client_cert) if mutual else None,
                     key=str(certs.client_key) if mutual else None, server_name=SERVER_NAME)


async def _score(target: str, tls: RemoteTls | None, name: str = "probe"):
    scorer = RemoteScorer(remote_spec(target, name, tls=tls))
    try:
        return await scorer.score(request(), deadline=soon())
    finally:
        await scorer.close()


def test_scores_come_back_over_tls(certs):
    async def main_():
        async with serving({"probe": FakeScorer(spec())}, tls=ServerTls(certs.server_cert, certs.server_key)) as server:
            return await _score(f"127.0.0.1:{server.port}", client_tls(certs))

    assert run(main_()).values == {"p": 0.25, "len": 5.0}


def test_mutual_tls_refuses_a_client_without_a_certificate_and_accepts_one_with_it(certs):
    async def main_():
        server_tls = ServerTls(certs.server_cert, certs.server_key, client_ca=certs.ca)
        async with serving({"probe": FakeScorer(spec())}, tls=server_tls) as server:
            target = f"127.0.0.1:{server.port}"
            with pytest.raises(ScorerError, match=f"Remote scorer 'probe' at {target} failed: UNAVAILABLE"):
                await _score(target, client_tls(certs))
            return await _score(target, client_tls(certs, mutual=True))

    assert run(main_()).values["p"] == 0.25


@pytest.mark.parametrize("case", ["wrong CA", "plaintext client", "plaintext server", "wrong server name"])
def test_every_tls_mismatch_is_a_scorer_error(certs, case):
    server_tls = None if case == "plaintext server" else ServerTls(certs.server_cert, certs.server_key)
    tls = {"wrong CA": client_tls(certs, ca=certs.other_ca), "plaintext client": None,
           "plaintext server": client_tls(certs),
           "wrong server name": RemoteTls(ca=str(certs.ca), server_name="other.test")}[case]

    async def main_():
        async with serving({"probe": FakeScorer(spec())}, tls=server_tls) as server:
            with pytest.raises(ScorerError, match="failed: UNAVAILABLE"):
                await _score(f"127.0.0.1:{server.port}", tls)

    run(main_())


def test_a_tls_file_gone_when_the_channel_is_made_is_a_scorer_error(certs, tmp_path):
    gone = tmp_path / "gone.crt"
    with pytest.raises(ScorerError, match=r"cannot read `remote.tls.ca` file '.*gone.crt'"):
        run(_score("127.0.0.1:9", RemoteTls(ca=str(gone))))


def test_scorers_differing_only_in_tls_do_not_share_a_channel(certs):
    async def main_():
        server_tls = ServerTls(certs.server_cert, certs.server_key)
        async with serving({"a": FakeScorer(spec("a")), "b": FakeScorer(spec("b"))}, tls=server_tls) as server:
            target = f"127.0.0.1:{server.port}"
            plain = RemoteScorer(remote_spec(target, "a", tls=client_tls(certs)))
            mutual = RemoteScorer(remote_spec(target, "b", tls=client_tls(certs, mutual=True)))
            same = RemoteScorer(remote_spec(target, "b", tls=client_tls(certs, mutual=True)))
            try:
                for scorer in (plain, mutual, same):
                    await scorer.score(request(), deadline=soon())
                table = _channels[asyncio.get_running_loop()]
                keys = [key for key in table if key[0] == target]
                assert len(keys) == 2
                assert table[(target, client_tls(certs, mutual=True))].users == 2
            finally:
                for scorer in (plain, mutual, same):
                    await scorer.close()

    run(main_())


POLICY = """\
version: 1
backends:
  small: {cluster: small, model: s}
  large: {cluster: large, model: l}
default: small
fallback: large
scorers:
  probe:
    kind: probe
    checkpoints: {relope: unused}
    remote:
      target: "dns:///scorer.test:50061"
      tls:
        ca: CA
        cert: certs/client.crt
        key: certs/client.key
signals:
  small_ok: {kind: score, scorer: probe, above: 0.5}
rules:
  - {name: probe, when: {not: small_ok}, backend: large}
"""


def _policy(folder, certs: Certs, ca: str = "certs/ca.crt"):
    (folder / "certs").mkdir(exist_ok=True)
    for name in ("ca.crt", "client.crt", "client.key"):
        (folder / "certs" / name).write_bytes((certs.ca.parent / name).read_bytes())
    path = folder / "policy.yaml"
    path.write_text(POLICY.replace("CA", ca))
    return path


def test_the_policy_resolves_tls_paths_against_its_folder(certs, tmp_path):
    policy = PolicyFile.load(_policy(tmp_path, certs)).engine.policy
    assert policy.scorers["probe"].remote.tls == RemoteTls(
        ca=str(tmp_path / "certs" / "ca.crt"), cert=str(tmp_path / "certs" / "client.crt"),
        key=str(tmp_path / "certs" / "client.key"))


def test_policy_check_reports_a_missing_or_bad_tls_file_at_its_key(certs, tmp_path, capsys):
    path = _policy(tmp_path, certs, ca="certs/missing.crt")
    assert main(["policy", "check", str(path)]) == 1
    out = capsys.readouterr().out
    assert f"{path}:14:9:" in out
    assert f"`scorers.probe.remote.tls.ca` file '{tmp_path / 'certs' / 'missing.crt'}' does not exist." in out

    path.write_text(POLICY.replace("CA", "certs/ca.crt").replace("        key: certs/client.key\n", ""))
    assert main(["policy", "check", str(path)]) == 1
    out = capsys.readouterr().out
    assert f"{path}:13:7: `scorers.probe.remote.tls`: `tls.cert` is set but `tls.key` is not" in out

    (tmp_path / "certs" / "junk.crt").write_text("not a certificate\n")
    path.write_text(POLICY.replace("CA", "certs/junk.crt").replace("cert: certs/client.crt", "cert: certs/client.key"))
    assert main(["policy", "check", str(path)]) == 1
    out = capsys.readouterr().out
    assert "`scorers.probe.remote.tls.ca` file" in out and "holds no PEM certificate" in out
    assert f"{path}:15:9: `scorers.probe.remote.tls.cert` file" in out  # a key where the certificate belongs


def test_a_reload_to_a_policy_with_a_missing_tls_file_keeps_the_running_policy(certs, tmp_path):
    path = _policy(tmp_path, certs)
    policy = PolicyFile.load(path)
    running = policy.engine
    path.write_text(POLICY.replace("CA", "certs/missing.crt"))
    assert policy.reload() == "rejected"
    assert policy.engine is running
    with pytest.raises(PolicyError):
        PolicyFile.load(path)


def test_server_tls_flags_come_in_sets_and_bad_files_name_the_flag(certs, tmp_path, capsys):
    assert ServerTls.from_flags(None, None, None) is None
    assert main(["scorer", "serve", "--config", str(tmp_path / "unused.yaml"), "--listen", "127.0.0.1:0",
                 "--tls-cert", str(certs.server_cert)]) == 1
    assert "--tls-cert is set but --tls-key is not" in capsys.readouterr().err
    with pytest.raises(Exception, match="--tls-client-ca needs --tls-cert and --tls-key"):
        ServerTls.from_flags(None, None, certs.ca)
    with pytest.raises(Exception, match=r"--tls-key file '.*nope.key' cannot be read"):
        ServerTls(certs.server_cert, tmp_path / "nope.key").credentials()


def test_a_renewed_ca_file_is_read_without_a_restart(certs, tmp_path, monkeypatch):
    # the sidecar's CA file first holds the wrong CA (calls fail: fallback); once it is
    # replaced (a renewed Secret), the next look at the files brings a new channel that scores
    import extproc.scoring._remote as remote_scorer

    monkeypatch.setattr(remote_scorer, "TLS_RECHECK_S", 0.0)
    ca = tmp_path / "ca.crt"
    ca.write_bytes(certs.other_ca.read_bytes())

    async def main_():
        async with serving({"probe": FakeScorer(spec())}, tls=ServerTls(certs.server_cert, certs.server_key)) as server:
            scorer = RemoteScorer(remote_spec(f"127.0.0.1:{server.port}", tls=client_tls(certs, ca=ca)))
            try:
                with pytest.raises(ScorerError, match="UNAVAILABLE"):
                    await scorer.score(request(), deadline=soon())
                first = scorer._held[1]
                ca.write_bytes(certs.ca.read_bytes())
                scores = await scorer.score(request(), deadline=soon())
                second = scorer._held[1]
                again = await scorer.score(request(), deadline=soon())  # unchanged files: same channel
                return scores, again, first, second, scorer._held[1]
            finally:
                await scorer.close()

    scores, again, first, second, third = run(main_())
    assert scores.values["p"] == 0.25 and again.values["p"] == 0.25
    assert second is not first and third is second
    assert first.users == 0  # the old channel was let go (and closed)


def test_renewed_server_files_serve_new_connections_without_a_restart(certs, tmp_path):
    cert, key = tmp_path / "server.crt", tmp_path / "server.key"
    cert.write_bytes(certs.server_cert.read_bytes())
    key.write_bytes(certs.server_key.read_bytes())
    renewed_cert, renewed_key = renewed_server(certs, tmp_path / "renewal")

    async def main_():
        async with serving({"probe": FakeScorer(spec())}, tls=ServerTls(cert, key)) as server:
            target = f"127.0.0.1:{server.port}"
            before = await _score(target, client_tls(certs))
            with pytest.raises(ScorerError, match="UNAVAILABLE"):  # not yet signed by the other CA
                await _score(target, client_tls(certs, ca=certs.other_ca))
            key.write_bytes(renewed_key.read_bytes())  # the Secret is renewed under the other CA
            cert.write_bytes(renewed_cert.read_bytes())
            after = await _score(target, client_tls(certs, ca=certs.other_ca))  # a new connection
            with pytest.raises(ScorerError, match="UNAVAILABLE"):  # the old certificate is gone
                await _score(target, client_tls(certs))
            return before, after

    before, after = run(main_())
    assert before.values["p"] == after.values["p"] == 0.25
