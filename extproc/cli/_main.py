"""The ``switchyard`` command line (also ``python -m extproc``).

    switchyard serve --policy PATH [--listen HOST:PORT] [--workers N] [--drain-seconds S] [--grace S]
                     [--reload-interval S] [--metrics-listen HOST:PORT] [--max-policy-bytes N] [--shadow PATH]
                     [--envoy-admin URL]
    switchyard policy check PATH... [--envoy CONFIG] [--max-policy-bytes N]
    switchyard envoy render --policy PATH --backend NAME=HOST:PORT ... [--tls NAME[=SNI]] [--out FILE]
    switchyard policy explain PATH --request BODY.json [--header NAME=VALUE ...] [--unhealthy BACKEND ...]
                     [--max-policy-bytes N]
    switchyard policy explain PATH --requests REQUESTS.jsonl [--header NAME=VALUE ...]   (one decision a line)
    switchyard policy diff A B --requests REQUESTS.jsonl [--header NAME=VALUE ...]   (where A and B differ)
    switchyard policy schema [--markdown]
    switchyard train probe|latent-router ...   (needs the `ml` extra)
    switchyard eval --checkpoint DIR ...       (needs the `ml` extra)
    switchyard calibrate --checkpoint DIR ...  (needs the `ml` extra)
    switchyard scorer serve --config FILE --listen HOST:PORT   (needs the `ml` extra)
    switchyard label --config FILE --input PROMPTS.jsonl --output LABELLED.jsonl [--max-cost USD] [--dry-run]

The learned-scorer commands live in ``routers.cli``; they are registered only when one of
them is asked for, so ``serve`` and ``policy`` never import ``routers`` or torch.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
from pathlib import Path

from extproc._defaults import DEFAULT_EXTPROC_ADDRESS, DEFAULT_GRACE_S, LEARNED_COMMANDS
from extproc._errors import PolicyError, RequestError, SwitchyardError
from extproc.engine._decision import Decision
from extproc.policy._loading import DEFAULT_MAX_POLICY_BYTES, load_policy
from extproc.policy._model import Policy
from extproc.request._body import RoutingRequest, parse_json_body
from extproc.traffic._health import STALE_AFTER_S

__all__ = ["main", "build_parser"]

#: ``serve --drain-seconds``: after SIGTERM/SIGINT the server keeps taking new streams this
#: long, its health NOT_SERVING, so that Envoy and the load balancers in front stop sending
#: to it before it refuses anything.
DEFAULT_DRAIN_S = 5.0
#: ``serve --reload-interval``: seconds between checks of the policy file (0: only on SIGHUP).
DEFAULT_RELOAD_INTERVAL_S = 5.0


def _max_policy_bytes(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-policy-bytes", type=_positive_int("--max-policy-bytes"), default=DEFAULT_MAX_POLICY_BYTES,
                        metavar="BYTES", help="Refuse a larger policy file before parsing it (default "
                                              f"{DEFAULT_MAX_POLICY_BYTES}, 1 MiB, a ConfigMap's own limit).")


def _positive_int(option: str):
    def parse(raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            value = 0
        if value < 1:
            raise argparse.ArgumentTypeError(f"{option} must be a whole number of bytes >= 1, got {raw!r}")
        return value

    return parse


def build_parser(with_routers: bool = False) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="switchyard",
        description="Envoy external processor that routes LLM requests to model backends.",
        epilog="Learned scorers: `switchyard train|eval|calibrate|scorer --help` (needs `pip install 'switchyard[ml]'`).",
    )
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="Run the ext_proc gRPC server.")
    serve.add_argument("--policy", type=Path, required=True, help="Policy YAML file.")
    serve.add_argument("--listen", default=DEFAULT_EXTPROC_ADDRESS,
                       help=f"HOST:PORT to listen on (default {DEFAULT_EXTPROC_ADDRESS}).")
    serve.add_argument("--workers", type=int, default=1, help="Processes sharing the port via SO_REUSEPORT (default 1).")
    serve.add_argument("--drain-seconds", type=float, default=DEFAULT_DRAIN_S, metavar="SECONDS",
                       help="After SIGTERM/SIGINT, keep routing new requests this long while the health check says "
                            "NOT_SERVING, so the proxy in front stops sending first; a second signal ends the drain "
                            f"at once (default {DEFAULT_DRAIN_S:g}; 0: refuse new streams at once).")
    serve.add_argument("--grace", type=float, default=DEFAULT_GRACE_S, metavar="SECONDS",
                       help=f"Then, seconds in-flight streams get to finish (default {DEFAULT_GRACE_S:g}).")
    serve.add_argument("--reload-interval", type=float, default=DEFAULT_RELOAD_INTERVAL_S, metavar="SECONDS",
                       help="Re-read the policy file this often; a valid change takes effect, a bad one is "
                            f"logged and ignored (default {DEFAULT_RELOAD_INTERVAL_S:g}; 0: only on SIGHUP).")
    serve.add_argument("--metrics-listen", metavar="HOST:PORT", default=None,
                       help="Serve Prometheus metrics at http://HOST:PORT/metrics (default: off). With --workers N "
                            "the parent process serves every worker's series, labelled worker=\"<i>\". OTLP export "
                            "follows the standard OTEL_* variables.")
    serve.add_argument("--shadow", type=Path, metavar="PATH", default=None,
                       help="A candidate policy YAML file that decides every routed request again, after the live "
                            "answer has gone and off its latency, sharing the loaded scorers; only metrics record "
                            "what it chose (switchyard_shadow_*). Watched and reloaded like --policy; a bad or "
                            "failing shadow never touches live traffic (default: none).")
    serve.add_argument("--envoy-admin", metavar="URL", default=None,
                       help="Envoy's admin endpoint, e.g. http://127.0.0.1:9901: every second each process reads "
                            "its cluster list, and the rules skip (and LatentRouter masks) the backends whose "
                            "cluster has no healthy host (outlier-ejected, failing health checks). Unreachable, "
                            f"the last view is dropped after {STALE_AFTER_S:g} s and every backend counts as healthy again; when "
                            "every backend a request may use is down, health is ignored (default: off).")
    _max_policy_bytes(serve)
    serve.set_defaults(handler=_serve)

    policy = sub.add_parser("policy", help="Check, explain or describe policy files.")
    policy_sub = policy.add_subparsers(dest="policy_command", required=True, metavar="ACTION")
    check = policy_sub.add_parser("check", help="Validate policy files; print every problem as PATH:LINE:COLUMN: message.")
    check.add_argument("paths", type=Path, nargs="+", metavar="PATH")
    check.add_argument("--envoy", type=Path, metavar="CONFIG",
                       help="Also check that this Envoy bootstrap has every backend's cluster and route, removes "
                            "client x-switchyard-* headers before routing, and buffers bodies up to "
                            "routing.max_body_bytes plus the model rewrite; the ok line says whether it fails closed "
                            "or open (--fail-open).")
    _max_policy_bytes(check)
    check.set_defaults(handler=_check)
    explain = policy_sub.add_parser("explain", help="Print the decision for one request body (or many) as JSON.")
    explain.add_argument("path", type=Path, metavar="PATH", help="Policy YAML file.")
    given = explain.add_mutually_exclusive_group(required=True)
    given.add_argument("--request", type=Path, help="JSON body file ('-' for stdin).")
    given.add_argument("--requests", type=Path, metavar="FILE",
                       help="JSONL file of requests ('-' for stdin), one a line: an OpenAI body, or {\"body\": BODY, "
                            "\"headers\": {NAME: VALUE}, \"id\": ID}. All are decided in this one process (the "
                            "scorers load once); prints one JSON decision a line, in input order, with `line` (and "
                            "`id` when given), its scores, or `error` for a request that gets an error answer.")
    explain.add_argument("--header", action="append", default=[], metavar="NAME=VALUE",
                         help="A request header (repeatable; with --requests, for every request, under each line's own).")
    explain.add_argument("--unhealthy", action="append", default=[], metavar="BACKEND",
                         help="Decide as if Envoy reported this backend down, as `serve --envoy-admin` learns it "
                              "(repeatable; with --request only): rules skip it with reason `backend unhealthy`.")
    _max_policy_bytes(explain)
    explain.set_defaults(handler=_explain)
    diff = policy_sub.add_parser("diff", help="Decide the same requests with two policies; print where they differ.")
    diff.add_argument("live", type=Path, metavar="A", help="The policy in use (YAML file).")
    diff.add_argument("candidate", type=Path, metavar="B", help="The candidate policy (YAML file).")
    diff.add_argument("--requests", type=Path, metavar="FILE", required=True,
                      help="JSONL file of requests ('-' for stdin), as `policy explain --requests` reads it (a "
                           "capture file too). Prints one JSON line per request the policies route differently "
                           "(`line`, `id`, `a`, `b`: backend and rule, or error), then one `summary` line: "
                           "requests, agreement rate, the (A backend, B backend) pair counts, and each policy's "
                           "large share and cost.")
    diff.add_argument("--header", action="append", default=[], metavar="NAME=VALUE",
                      help="A request header for every request (repeatable; under each line's own).")
    _max_policy_bytes(diff)
    diff.set_defaults(handler=_diff)
    schema = policy_sub.add_parser("schema", help="Print the policy JSON Schema (or the key tables of docs/policy-reference.md).")
    schema.add_argument("--markdown", action="store_true", help="Print the key reference of docs/policy-reference.md instead.")
    schema.set_defaults(handler=_schema)

    from extproc.cli._envoy import register as register_envoy

    register_envoy(sub)

    if with_routers:
        from routers.cli import register

        register(sub)
    return parser


def _serve(args: argparse.Namespace) -> int:
    from extproc.server._serve import serve

    if args.workers < 1:
        raise SwitchyardError(f"--workers must be >= 1, got {args.workers}.")
    if args.reload_interval < 0:
        raise SwitchyardError(f"--reload-interval must be >= 0, got {args.reload_interval}.")
    for option, value in (("--drain-seconds", args.drain_seconds), ("--grace", args.grace)):
        if not (math.isfinite(value) and value >= 0):
            raise SwitchyardError(f"{option} must be a number of seconds >= 0, got {value}.")
    return serve(args.policy, args.listen, workers=args.workers, grace=args.grace, drain=args.drain_seconds,
                 reload_interval=args.reload_interval, metrics_listen=args.metrics_listen,
                 max_policy_bytes=args.max_policy_bytes, shadow=args.shadow, envoy_admin=args.envoy_admin)


def _check(args: argparse.Namespace) -> int:
    status = 0
    for path in args.paths:
        try:
            policy = load_policy(path, args.max_policy_bytes)
        except PolicyError as error:
            for problem in error.problems:
                print(problem)
            status = 1
            continue
        envoy_problems, envoy_mode = _envoy_check(policy, args.envoy) if args.envoy else ([], "")
        for problem in envoy_problems:
            print(problem)
        if envoy_problems:
            status = 1
        else:
            print(f"{path}: ok" + (f" (with {args.envoy}; {envoy_mode})" if args.envoy else ""))
    return status


def _envoy_check(policy, config_path: Path) -> tuple[list[str], str]:
    """The disagreements between ``policy`` and the Envoy config, and its failure mode in words."""
    import yaml

    from extproc.envoy._render import check_envoy_config, envoy_fail_open

    try:
        config = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise SwitchyardError(f"Cannot read the Envoy config {config_path}: {exc}") from exc
    if not isinstance(config, dict):
        raise SwitchyardError(f"{config_path} is not an Envoy bootstrap (a YAML mapping).")
    if envoy_fail_open(config):
        mode = (f"fail-open: a request switchyard cannot answer goes to the default backend {policy.default!r}, "
                f"its model not rewritten")
    else:
        mode = "fail closed: a request switchyard cannot answer gets 500/504 router_unavailable"
    return check_envoy_config(policy, config, source=str(config_path)), mode


def _headers(items: list[str]) -> dict[str, str]:
    """``--header NAME=VALUE`` options as a header map (names lower-cased)."""
    headers = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise SwitchyardError(f"--header must be NAME=VALUE, got {item!r}.")
        headers[name.strip().lower()] = value
    return headers


def _diff(args: argparse.Namespace) -> int:
    from extproc.cli._explain_many import diff_many

    live = load_policy(args.live, args.max_policy_bytes)
    candidate = load_policy(args.candidate, args.max_policy_bytes)
    return diff_many(live, candidate, args.requests, _headers(args.header))


def _explain(args: argparse.Namespace) -> int:
    policy = load_policy(args.path, args.max_policy_bytes)
    headers = _headers(args.header)
    unknown = [name for name in args.unhealthy if name not in policy.backends]
    if unknown:
        raise SwitchyardError(f"--unhealthy {unknown[0]!r} is not a backend of {args.path} "
                              f"(backends: {', '.join(policy.backends)}).")
    if args.requests is not None:
        if args.unhealthy:
            raise SwitchyardError("--unhealthy works with --request only, not with --requests.")
        from extproc.cli._explain_many import explain_many

        return explain_many(policy, args.requests, headers)
    raw = sys.stdin.buffer.read() if str(args.request) == "-" else args.request.read_bytes()
    try:
        body = parse_json_body(raw, max_bytes=policy.routing.max_body_bytes)
        decision = asyncio.run(_decide(policy, RoutingRequest(headers=headers, body=body), frozenset(args.unhealthy)))
    except RequestError as error:
        print(json.dumps({"error": {"status": error.status, "code": error.code, "message": str(error)}}, indent=2))
        return 2
    print(json.dumps(decision.explain(), indent=2, ensure_ascii=False))
    return 0


async def _decide(policy: Policy, request: RoutingRequest, unhealthy: frozenset[str] = frozenset()) -> Decision:
    """Decide like the server does: the same scorers, loaded the same way, the same loop;
    ``unhealthy``: the backends to count as down."""
    from extproc.engine._engine import SignalMemo
    from extproc.scoring._cache import loaded_engine
    from extproc.scoring._decide import decide_with_scores

    async with loaded_engine(policy) as engine:
        return await decide_with_scores(engine, request, memo=SignalMemo(request, unhealthy=unhealthy))


def _schema(args: argparse.Namespace) -> int:
    from extproc.policy._schema import json_schema_text, markdown_reference

    sys.stdout.write(markdown_reference() if args.markdown else json_schema_text())
    return 0


def _command(argv: list[str]) -> str | None:
    """The command ``argv`` names: its first word that is neither an option nor the value of
    the top-level ``--log-level`` (``switchyard --log-level debug train ...``)."""
    words = iter(argv)
    for word in words:
        if word == "--log-level":
            next(words, None)
        elif not word.startswith("-"):
            return word
    return None


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (0 ok, 1 invalid input/problems, 2 request error)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(with_routers=_command(argv) in LEARNED_COMMANDS)
    args = parser.parse_args(argv)
    from extproc.telemetry._instruments import configure_logging

    configure_logging(args.log_level)
    try:
        return int(args.handler(args) or 0)
    except PolicyError as error:
        for problem in error.problems:
            print(problem, file=sys.stderr)
        return 1
    except SwitchyardError as error:
        print(f"switchyard: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # e.g. `switchyard policy explain ... | head`
        sys.stderr.close()
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
