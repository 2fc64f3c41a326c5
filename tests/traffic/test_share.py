"""The large-share controller (policy ``share:``): a traffic-mix shift that would double the
large share at a fixed threshold is held near the target, within the bounds; the threshold is
the fleet's (two replicas, one real Valkey); the policy's checks.

Simulated traffic: the scorer's output is drawn from a seeded distribution and handed to the real
engine; the controller and the store run on one fake clock, so an hour of traffic takes a second.
"""

from __future__ import annotations

import asyncio
import random

import pytest

from extproc import PolicyEngine, PolicyError, RoutingRequest, Scores, parse_policy
from extproc.engine._engine import SignalMemo
from extproc.state import MemoryStore, RedisStore
from extproc.traffic._share import ShareController

from tests.extproc.conftest import chat

#: Hang guard for calls that must return: generous, never a timing assertion.
RETURNS_WITHIN_S = 30.0

POLICY = """
version: 1
backends:
  small: {cluster: small, model: s-model}
  large: {cluster: large, model: l-model}
default: small
scorers:
  probe: {kind: probe, checkpoints: {relope: unused}, remote: {target: "127.0.0.1:9"}}
signals:
  hard: {kind: score, scorer: probe, BOUND: 0.7}
  short: {kind: token_count, below: 2}
rules:
  - {name: hard, when: HARD, backend: large}
"""
SHARE = ("share: {signal: hard, target: 0.3, large: [large], min_threshold: 0.3, max_threshold: MAX, "
         "window_s: 120, update_s: 5, min_requests: 20}\n")
RATE = 2.0  # requests per second


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def policy(bound="above", hard="hard", maximum=1.2, share=SHARE):
    text = POLICY.replace("BOUND", bound).replace("HARD", hard)
    return parse_policy(text + share.replace("MAX", str(maximum)) if share else text, source="p.yaml")


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, RETURNS_WITHIN_S))


async def route(pol, eng, controller, score):
    """Decide one request whose probe score is ``score``; count it. Its backend."""
    request = RoutingRequest(headers={}, body=chat("explain it"))
    memo = SignalMemo(request, controller.thresholds(pol) if controller is not None else None)
    decision = eng.decide(request, {"probe": Scores({"relope": score})}, memo)
    if controller is not None:
        await controller.observe(pol, decision)
    return decision.backend.name


async def simulate(pol, controlled: bool, shift: float, seconds: float = 2400.0):
    """Traffic at :data:`RATE`, scores uniform on [0, 1) for the first half, then on
    [shift, 1 + shift); the large share of the last window, and the controller."""
    clock = Clock(1_000_000.0)
    controller = ShareController(MemoryStore(clock=clock), clock=clock) if controlled else None
    eng, rng, routes = PolicyEngine(pol), random.Random(7), []
    for step in range(int(seconds * RATE)):
        offset = shift if step >= seconds * RATE / 2 else 0.0
        routes.append(await route(pol, eng, controller, rng.random() + offset))
        clock.now += 1 / RATE
    last_window = routes[-int(120 * RATE):]
    return last_window.count("large") / len(last_window), controller


def test_a_mix_shift_that_doubles_the_share_at_a_fixed_threshold_is_held_near_the_target():
    pol = policy()
    fixed, _ = run(simulate(pol, controlled=False, shift=0.3))
    held, controller = run(simulate(pol, controlled=True, shift=0.3))
    assert fixed == pytest.approx(0.6, abs=0.08)  # 0.3 before the shift: doubled
    assert held == pytest.approx(0.3, abs=0.08)
    assert 0.9 <= controller.thresholds(pol)["hard"] <= 1.1  # the threshold that gives 0.3 now: 1.0


def test_the_threshold_stays_within_its_bounds():
    pol = policy(maximum=0.8)
    held, controller = run(simulate(pol, controlled=True, shift=0.6))
    assert controller.thresholds(pol)["hard"] == 0.8  # at the bound: it cannot do more
    assert held == pytest.approx(0.8, abs=0.08)  # and the share says so


def test_a_below_signal_moves_the_other_way():
    """`hard` as `below: 0.3` (a low P(small model correct) goes large): a mix shifted down
    doubles the share at the written threshold; the controller lowers the threshold."""
    pol = parse_policy(POLICY.replace("BOUND: 0.7", "below: 0.3").replace("HARD", "hard") + SHARE.replace(
        "min_threshold: 0.3", "min_threshold: -0.5").replace("MAX", "0.7"))
    fixed, _ = run(simulate(pol, controlled=False, shift=-0.3))
    held, controller = run(simulate(pol, controlled=True, shift=-0.3))
    assert fixed == pytest.approx(0.6, abs=0.08)
    assert held == pytest.approx(0.3, abs=0.08)
    assert -0.1 <= controller.thresholds(pol)["hard"] <= 0.1  # the threshold that gives 0.3 now: 0.0


def test_without_share_the_written_threshold_decides_and_nothing_is_counted():
    pol = policy(share="")
    store = MemoryStore()
    controller = ShareController(store)
    assert controller.thresholds(pol) is None
    assert run(route(pol, PolicyEngine(pol), controller, 0.75)) == "large"
    assert len(store) == 0


def test_a_bad_stored_threshold_is_ignored_and_the_written_one_decides():
    pol = policy()
    clock = Clock(1_000_000.0)
    store = MemoryStore(clock=clock)
    controller = ShareController(store, clock=clock)
    run(store.set("share:hard:threshold", "nan", 60))
    run(route(pol, PolicyEngine(pol), controller, 0.5))
    assert controller.thresholds(pol) == {"hard": 0.7}


@pytest.mark.parametrize("share, expected", [
    ("share: {signal: nope, target: 0.3, large: [large], min_threshold: 0, max_threshold: 1}\n",
     "p.yaml:14:9: `share.signal` names signal 'nope', which is not defined"),
    ("share: {signal: short, target: 0.3, large: [large], min_threshold: 0, max_threshold: 1}\n",
     "p.yaml:14:9: `share.signal` must name a `score` signal; 'short' is a `token_count` signal."),
    ("share: {signal: hard, target: 0.3, large: [huge], min_threshold: 0, max_threshold: 1}\n",
     "p.yaml:14:44: `share.large[0]` names backend 'huge', which is not defined"),
    ("share: {signal: hard, target: 0.3, large: [large], min_threshold: 1, max_threshold: 0.5}\n",
     "p.yaml:14:70: `share.max_threshold` (0.5) must be greater than `share.min_threshold` (1.0)."),
    ("share: {signal: hard, target: 1.5, large: [large], min_threshold: 0, max_threshold: 1}\n",
     "p.yaml:14:31: `share.target` must be <= 1"),
])
def test_share_problems_are_located(share, expected):
    with pytest.raises(PolicyError) as raised:
        policy(share=share)
    assert any(str(p).startswith(expected) for p in raised.value.problems), raised.value.problems


def test_a_two_sided_score_signal_cannot_be_controlled():
    text = POLICY.replace("BOUND: 0.7", "above: 0.2, below: 0.9").replace("HARD", "hard")
    with pytest.raises(PolicyError) as raised:
        parse_policy(text + SHARE.replace("MAX", "1"), source="p.yaml")
    assert "sets both `above` and `below`" in str(raised.value)


def test_two_replicas_count_into_one_share_and_decide_with_one_threshold(redis_server):
    """Replica A takes the period's turn and moves the threshold; replica B, in the same period,
    reads A's threshold (it cannot take the turn), so both decide alike."""
    pol = policy(share=SHARE.replace("update_s: 5", "update_s: 60").replace("min_requests: 20", "min_requests: 10"))
    clock = Clock(0.0)

    async def scenario():
        stores = [RedisStore(redis_server.url, timeout_s=5.0, key_prefix="t:") for _ in range(2)]
        a, b = (ShareController(store, clock=clock, replica=name) for store, name in zip(stores, "ab"))
        eng = PolicyEngine(pol)
        try:
            for i in range(20):  # every request hard: share 1.0, far over the 0.3 target
                await route(pol, eng, (a, b)[i % 2], 0.95)
            counted = await stores[1].read_sliding("share:hard:all", 120)
            clock.now += 61  # the next sync of each replica: A first, so A has the turn
            await route(pol, eng, a, 0.95)
            await route(pol, eng, b, 0.95)
            return counted, a.thresholds(pol)["hard"], b.thresholds(pol)["hard"]
        finally:
            for store in stores:
                await store.aclose()

    counted, moved_a, moved_b = run(scenario())
    assert counted == 20
    assert moved_a > 0.7 and moved_b == moved_a
