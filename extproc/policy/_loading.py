"""The typed policy, and loading it from YAML with every problem located.

:func:`load_policy` reads a file, validates it against ``extproc.policy._schema`` on the YAML node
tree, then checks what a schema cannot (references between sections, regexes, duplicate
rule names, tokenizer files) and returns a :class:`Policy` or raises one
:class:`PolicyError` listing every problem as ``file:line:column: message``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from extproc._errors import PolicyError, PolicyProblem
from extproc._schema import REQUIRED, ListOf, MapOf, Validation, compose_yaml, dotted
from extproc.policy._model import ALWAYS, AllOf, Always, AnyOf, Condition, Not, Policy, Rule, SignalRef
from extproc.policy._schema import POLICY_SCHEMA, SCORERS_FILE_SCHEMA
from extproc.policy._scorer_specs import build_scorer_specs, check_score_signal, check_utility_route
from extproc.policy._sections import (
    Backend,
    BudgetsConfig,
    CaptureConfig,
    ModelsConfig,
    Price,
    RoutingConfig,
    SessionsConfig,
    ShareConfig,
    TenantsConfig,
)
from extproc.scorers._interface import BreakerConfig, ScorerSpec
from extproc.state import StateConfig
from extproc.signals._kinds import ScoreSignal, Signal, build_signal

__all__ = [
    "load_policy",
    "parse_policy",
    "read_policy_text",
    "read_scorer_specs",
    "DEFAULT_MAX_POLICY_BYTES",
]


#: ``--max-policy-bytes``: the largest policy file switchyard reads. Checked before a byte is
#: parsed, so an oversized file costs neither time nor memory (a reload keeps the running
#: policy). 1 MiB is a Kubernetes ConfigMap's own limit and some 300 times the shipped
#: default policy; a policy that size parses in 1–2 s of one core (libyaml, when PyYAML has it).
DEFAULT_MAX_POLICY_BYTES = 1 << 20


def _too_large(path: str | Path, size: str, max_bytes: int) -> PolicyError:
    return PolicyError([PolicyProblem(str(path), 1, 1, (
        f"The policy file is {size} bytes, over the limit of {max_bytes} bytes (--max-policy-bytes); "
        f"it was not parsed."))])


def read_policy_text(path: str | Path, max_bytes: int = DEFAULT_MAX_POLICY_BYTES) -> str:
    """The policy file's text; an unreadable file, or one over ``max_bytes`` (checked before
    reading more than ``max_bytes + 1`` bytes), is a :class:`PolicyError` at ``path:1:1``."""
    try:
        with open(path, "rb") as file:
            size = os.fstat(file.fileno()).st_size
            if size > max_bytes:
                raise _too_large(path, str(size), max_bytes)
            data = file.read(max_bytes + 1)  # a file that grew, or a pipe, is cut here too
        if len(data) > max_bytes:
            raise _too_large(path, f"more than {max_bytes}", max_bytes)
        return data.decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PolicyError([PolicyProblem(str(path), 1, 1, f"Cannot read the policy file: {exc}.")]) from exc


def load_policy(path: str | Path, max_bytes: int = DEFAULT_MAX_POLICY_BYTES) -> Policy:
    """Read and validate the policy file at ``path`` (at most ``max_bytes`` long)."""
    path = Path(path)
    return parse_policy(read_policy_text(path, max_bytes), source=str(path), base_dir=path.parent)


def parse_policy(text: str, *, source: str = "<policy>", base_dir: Path | None = None,
                 checkpoints: dict[str, str] | None = None) -> Policy:
    """Validate policy YAML ``text``; ``source`` names it in error messages. ``checkpoints``,
    when given, gets each local checkpoint folder the policy names with its fingerprint from
    before it was read (also when the policy is rejected), so a reload can tell whether they
    changed since."""
    v = Validation(source)
    root = compose_yaml(text, source)
    v.marks[()] = (root.start_mark.line + 1, root.start_mark.column + 1)
    data = POLICY_SCHEMA.validate(root, (), v)
    if v.problems:  # go on with the parts that validated, so one run lists every problem
        data = _checkable(data, v.broken)
        if data is None:
            raise PolicyError(v.problems)
    policy = _build(data, v, base_dir or Path("."), checkpoints)
    if v.problems:
        raise PolicyError(v.problems)
    return policy


def _checkable(data: dict[str, Any] | None, broken: set[tuple]) -> dict[str, Any] | None:
    """What of a policy with schema problems the later checks can still read.

    A backend, signal, scorer or rule with a problem is ``None`` already (the checks skip it;
    its name still counts as defined); a broken optional section becomes its default, a
    broken ``version`` or ``default`` ``None``. ``None`` when ``backends`` or ``rules`` is
    not even a mapping / list.
    """
    if data is None:
        return None
    out = dict(data)
    for key, spec in POLICY_SCHEMA.keys.items():
        if (key,) not in broken:
            continue
        container = isinstance(spec.schema, (MapOf, ListOf))
        if container and data.get(key) is not None:
            continue
        if spec.default is not REQUIRED:
            out[key] = spec.default
        elif container:
            return None
        else:
            out[key] = None
    return out




def _build(data: dict[str, Any], v: Validation, base_dir: Path, checkpoints: dict[str, str] | None) -> Policy:
    def report(path: tuple, message: str) -> None:
        v.problem(None, message, path)

    backends = {
        name: _backend(name, spec)
        for name, spec in data["backends"].items()
        if spec is not None  # None: it has a schema problem (see _checkable)
    }
    defined = ", ".join(data["backends"])

    def check_backend(name: str | None, path: tuple) -> None:
        if name is not None and name not in data["backends"]:
            report(path, f"`{dotted(path)}` names backend {name!r}, which is not defined; defined: {defined}.")

    for name, spec in data["backends"].items():
        if spec is not None:
            _check_fallbacks(name, spec["fallbacks"], ("backends", name, "fallbacks"), check_backend, report)
    check_backend(data["default"], ("default",))
    if data["fallback"] is not None:
        check_backend(data["fallback"], ("fallback",))

    valid_scorers = {name: config for name, config in data["scorers"].items() if config is not None}
    scorers, described = build_scorer_specs(valid_scorers, base_dir, report, backends=backends, checkpoints=checkpoints)
    defined_scorers = tuple(data["scorers"])  # with those that have problems: already reported

    if ALWAYS in data["signals"]:
        report(("signals", ALWAYS), f"`{ALWAYS}` is reserved (`when: {ALWAYS}` is the condition that always holds); "
               "rename the signal.")
    signals: dict[str, Signal] = {}
    for name, config in data["signals"].items():
        if config is None:
            continue
        signal = build_signal(name, config, base_dir, lambda key, msg, n=name: report(("signals", n) + key, msg))
        if signal is not None:
            check_score_signal(signal, scorers, described, lambda key, msg, n=name: report(("signals", n) + key, msg),
                               defined_scorers)
            signals[name] = signal

    rules: list[Rule] = []
    seen: dict[str, int] = {}
    for index, spec in enumerate(data["rules"]):
        if spec is None:
            continue
        path = ("rules", index)
        if spec["name"] in seen:
            report(path + ("name",), f"Duplicate rule name {spec['name']!r}; rules[{seen[spec['name']]}] has it too.")
        seen.setdefault(spec["name"], index)
        route = None
        if (spec["backend"] is None) == (spec["route"] is None):
            report(path, f"`{dotted(path)}` needs exactly one of `backend` and `route`.")
        elif spec["backend"] is not None:
            check_backend(spec["backend"], path + ("backend",))
        elif spec["route"] is not None:
            route = check_utility_route(spec["route"], scorers, described, backends,
                                        lambda key, msg: report(path + ("route",) + key, msg), defined_scorers)
        when = _condition(spec["when"], path + ("when",), data["signals"], report)
        fallbacks = spec.get("fallbacks")
        if fallbacks is not None:
            _check_fallbacks(spec["backend"], fallbacks, path + ("fallbacks",), check_backend, report)
        rule = Rule(spec["name"], when, spec["backend"], route, breaks_session=spec.get("breaks_session", False),
                    fallbacks=tuple(fallbacks) if fallbacks is not None else None)
        _check_breaks_session(rule, signals, data.get("sessions") is not None, lambda msg, p=path: report(
            p + ("breaks_session",), msg))
        rules.append(rule)

    tenants = data["tenants"]
    for tenant, names in tenants["allow"].items():
        for i, name in enumerate(names):
            check_backend(name, ("tenants", "allow", tenant, i))
    if tenants["otherwise"] is not None:
        for i, name in enumerate(tenants["otherwise"]):
            check_backend(name, ("tenants", "otherwise", i))

    models, routing = data["models"], data["routing"]
    for i, p in enumerate(routing["paths"]):
        if not p.startswith("/"):
            report(("routing", "paths", i), f"`routing.paths[{i}]` must start with '/', got {p!r}.")
    return Policy(
        source=v.source,
        backends=backends,
        default=data["default"],
        signals=signals,
        rules=tuple(rules),
        models=ModelsConfig(frozenset(models["routed"]), models["direct"], models["unknown"]),
        tenants=TenantsConfig(
            tenants["header"].lower(),
            {t: tuple(b) for t, b in tenants["allow"].items()},
            tuple(tenants["otherwise"]) if tenants["otherwise"] is not None else None,
        ),
        routing=RoutingConfig(frozenset(routing["paths"]), routing["max_body_bytes"], routing["rewrite_model"]),
        fallback=data["fallback"],
        scorers=scorers,
        positions=dict(v.marks),
        capture=_capture(data["capture"], base_dir),
        budgets=_budgets(data.get("budgets"), tenants["header"].lower(), check_backend, report),
        share=_share(data.get("share"), signals, data["signals"], check_backend, report),
        sessions=_sessions(data.get("sessions")),
        state=StateConfig.from_mapping(data.get("state"), source=v.source, report=report),
    )


def _backend(name: str, spec: dict[str, Any]) -> Backend:
    fields = {k: val for k, val in spec.items() if k not in ("description", "price", "fallbacks")}
    price = spec.get("price")
    return Backend(name=name, **fields, price=Price(**price) if price is not None else None,
                   fallbacks=tuple(spec["fallbacks"]))


def _check_fallbacks(owner: str | None, fallbacks: list[str], path: tuple, check_backend, report) -> None:
    """A ``fallbacks`` list names defined backends, each once, never ``owner`` (the backend it is
    the failover of; ``None``: a utility rule, whose backend varies)."""
    seen: dict[str, int] = {}
    for i, name in enumerate(fallbacks):
        check_backend(name, path + (i,))
        if name == owner:
            report(path + (i,), f"`{dotted(path + (i,))}` names {name!r} itself; a backend cannot fail over to itself.")
        elif name in seen:
            report(path + (i,), f"`{dotted(path + (i,))}` names {name!r} again; `{dotted(path + (seen[name],))}` has it.")
        seen.setdefault(name, i)


def _budgets(section: dict[str, Any] | None, tenant_header: str, check_backend, report) -> BudgetsConfig | None:
    """The ``budgets:`` section (``None``: not set); ``when_spent`` needs exactly one of its keys."""
    if section is None:
        return None
    when = section["when_spent"] or {}
    backend, reject = when.get("backend"), when.get("reject")
    path = ("budgets", "when_spent")
    if (backend is None) == (reject is None):
        report(path, "`budgets.when_spent` needs exactly one of `backend` (a cheaper backend) and `reject: true`.")
    elif reject is False:
        report(path + ("reject",), "`budgets.when_spent.reject` must be `true` (or set `backend` instead); got false.")
    check_backend(backend, path + ("backend",))
    header = section["key"]["header"]
    return BudgetsConfig(
        header=header.lower() if header is not None else tenant_header,
        window_s=float(section["window_s"]),
        limits={name: float(limit) for name, limit in section["limits"].items() if limit is not None},
        output_tokens=section["output_tokens"],
        when_spent_backend=backend,
    )


def _sessions(section: dict[str, Any] | None) -> SessionsConfig | None:
    """The ``sessions:`` section (``None``: not set)."""
    if section is None:
        return None
    return SessionsConfig(key=section["key"], header=section["header"].lower(), ttl_s=float(section["ttl_s"]))


def _check_breaks_session(rule: Rule, signals: dict[str, Signal], sessions: bool, report) -> None:
    """A ``breaks_session`` rule is checked against a pinned request without scorers: it needs a
    fixed backend and cheap signals only, and a ``sessions:`` section to break."""
    if not rule.breaks_session:
        return
    if not sessions:
        report(f"Rule {rule.name!r} sets `breaks_session`, which has no effect without a `sessions:` section.")
    elif rule.route is not None:
        report(f"Rule {rule.name!r} sets `breaks_session` on a `route` (utility) rule; a pin is checked without "
               "running scorers, so only rules with a fixed `backend` may break a session.")
    else:
        scored = [name for name in _signal_names(rule.when) if isinstance(signals.get(name), ScoreSignal)]
        if scored:
            report(f"Rule {rule.name!r} sets `breaks_session` but its condition uses the `score` signal "
                   f"{scored[0]!r}; a pin is checked without running scorers, so a session-breaking rule may use "
                   "only cheap signals.")


def _signal_names(condition: Condition) -> list[str]:
    """Every signal a condition names, in order."""
    if isinstance(condition, SignalRef):
        return [condition.name]
    if isinstance(condition, Not):
        return _signal_names(condition.item)
    if isinstance(condition, (AllOf, AnyOf)):
        return [name for item in condition.items for name in _signal_names(item)]
    return []


def _share(section: dict[str, Any] | None, signals: dict[str, Signal], declared: dict[str, Any], check_backend,
           report) -> ShareConfig | None:
    """The ``share:`` section (``None``: not set): its signal a one-sided score signal, its
    backends defined, its bounds a range."""
    if section is None:
        return None
    name = section["signal"]
    signal = signals.get(name)
    if name not in declared:
        known = ", ".join(declared) or "none"
        report(("share", "signal"), f"`share.signal` names signal {name!r}, which is not defined; defined: {known}.")
    elif signal is not None and not isinstance(signal, ScoreSignal):
        report(("share", "signal"), f"`share.signal` must name a `score` signal; {name!r} is a `{signal.kind}` signal.")
    elif isinstance(signal, ScoreSignal) and signal.above is not None and signal.below is not None:
        report(("share", "signal"), f"`share.signal` {name!r} sets both `above` and `below`; the controller moves "
                                    "one threshold, so set only one.")
    for i, backend in enumerate(section["large"]):
        check_backend(backend, ("share", "large", i))
    low, high = section["min_threshold"], section["max_threshold"]
    if high <= low:
        report(("share", "max_threshold"),
               f"`share.max_threshold` ({high}) must be greater than `share.min_threshold` ({low}).")
    return ShareConfig(
        signal=name, target=float(section["target"]), large=tuple(section["large"]),
        min_threshold=float(low), max_threshold=float(high), window_s=float(section["window_s"]),
        gain=float(section["gain"]), update_s=float(section["update_s"]), min_requests=section["min_requests"],
    )


def _capture(section: dict[str, Any], base_dir: Path) -> CaptureConfig:
    """The ``capture:`` section; its ``path`` made absolute against the policy file's folder."""
    path = section["path"]
    return CaptureConfig(
        path=os.path.abspath(base_dir / path) if path is not None else None,
        sample_rate=float(section["sample_rate"]),
        exclude_tenants=frozenset(section["exclude_tenants"]),
        max_bytes=section["max_bytes"],
        keep=section["keep"],
        queue=section["queue"],
    )


def read_scorer_specs(path: str | Path) -> dict[str, ScorerSpec]:
    """The scorers of a ``switchyard scorer serve --config`` file (a ``scorers:`` mapping in the
    policy's format), validated and with their checkpoints described; raises :class:`PolicyError`."""
    path = Path(path)
    source = str(path)
    v = Validation(source)
    root = compose_yaml(read_policy_text(path), source)
    data = SCORERS_FILE_SCHEMA.validate(root, (), v)
    if data is None or v.problems:
        raise PolicyError(v.problems)
    for name, config in data["scorers"].items():
        if config.get("remote") is not None:
            v.problem(None, f"Scorer `{name}` is remote; a scorer service serves only in-process scorers.",
                      ("scorers", name, "remote"))
        if config.get("fallback") is not None or config.get("breaker") != asdict(BreakerConfig()):
            key = "fallback" if config.get("fallback") is not None else "breaker"
            v.problem(None, f"`scorers.{name}.{key}` has no effect in a scorer service: fallbacks and circuit "
                            "breakers belong to each sidecar's policy, which decides when a scorer fails.",
                      ("scorers", name, key))
    specs, _ = build_scorer_specs(data["scorers"], path.parent, lambda key, msg: v.problem(None, msg, key), backends=None)
    if v.problems:
        raise PolicyError(v.problems)
    return specs


def _condition(raw: Any, path: tuple, signals: dict[str, Any], report) -> Condition:
    if raw is None or raw == ALWAYS:
        return Always()
    if isinstance(raw, str):
        if raw not in signals:
            known = ", ".join(signals) or "none"
            report(path, f"`{dotted(path)}` refers to signal {raw!r}, which is not defined; defined: {known}.")
        return SignalRef(raw)
    (op, value), = raw.items()
    if op == "not":
        return Not(_condition(value, path + ("not",), signals, report))
    items: Sequence[Condition] = tuple(
        _condition(item, path + (op, i), signals, report) for i, item in enumerate(value)
    )
    return AllOf(items) if op == "all" else AnyOf(items)
