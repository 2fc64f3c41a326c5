"""Fixtures that run a real gateway: demo backends, switchyard and Envoy, on loopback.

``gateway(policy_path)`` starts one stack per (policy, options) and reuses it for the whole
session, so Envoy starts only a few times. Every stack is stopped at the end of the session,
whatever happened. When a test that used a gateway fails, the tails of its children's logs
(Envoy's access log included) are added to the failure report.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.gateway import DEFAULT_POLICY, Gateway


class GatewayFactory:
    """``factory(policy, max_body_bytes=None) -> Gateway``, started once per distinct key."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.gateways: dict[tuple, Gateway] = {}

    def __call__(self, policy: Path | str = DEFAULT_POLICY, *, max_body_bytes: int | None = None) -> Gateway:
        key = (str(Path(policy).resolve()), max_body_bytes)
        if key not in self.gateways:
            workdir = self.workdir / f"{len(self.gateways)}-{Path(policy).stem}"
            self.gateways[key] = Gateway(Path(policy), workdir, max_body_bytes=max_body_bytes).start()
        return self.gateways[key]

    def stop_all(self) -> None:
        for gateway in self.gateways.values():
            gateway.stop()


@pytest.fixture(scope="session")
def gateway(tmp_path_factory):
    """Factory: ``gateway(policy_path) -> Gateway`` (shared by every test of the session)."""
    factory = GatewayFactory(tmp_path_factory.mktemp("gateways"))
    try:
        yield factory
    finally:
        factory.stop_all()


@pytest.fixture(scope="session")
def default_gateway(gateway) -> Gateway:
    """The gateway running ``policies/default.yaml``."""
    return gateway(DEFAULT_POLICY)


def pytest_collection_modifyitems(items):
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.fspath).parents:
            item.add_marker(pytest.mark.envoy)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.when != "call" or not report.failed:
        return
    used: list[Gateway] = []
    for value in getattr(item, "funcargs", {}).values():
        if isinstance(value, Gateway):
            used.append(value)
        elif isinstance(value, GatewayFactory):
            used.extend(value.gateways.values())
    for gw in dict.fromkeys(used):
        report.sections.append((f"gateway logs ({gw.stack.policy.name}, {gw.url})", gw.logs()))
