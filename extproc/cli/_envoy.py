"""``switchyard envoy render``: write the Envoy bootstrap for a policy.

    switchyard envoy render --policy P --backend NAME=HOST:PORT ... [--tls NAME[=SNI]]
        [--credential NAME=HEADER:FILE [--credential-prefix NAME=PREFIX]] [--listen HOST:PORT]
        [--admin HOST:PORT] [--extproc HOST:PORT|unix:/PATH] [--ready HOST:PORT] [--fail-open]
        [--outlier NAME=VALUE ... | --no-outlier-detection] [--out FILE]

NAME is a policy backend or cluster name; every cluster of the policy needs a ``--backend``.
The rendering itself lives in :mod:`extproc.envoy._render`.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from pathlib import Path

from extproc._defaults import DEFAULT_EXTPROC_ADDRESS
from extproc.envoy._render import DEFAULT_PER_TRY_TIMEOUT_S, Address, Credential, EnvoyOptions, OutlierDetection, Upstream, render_envoy
from extproc._errors import EnvoyConfigError
from extproc.policy._loading import load_policy

__all__ = ["register"]


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``envoy`` command group to the top-level sub-parsers."""
    envoy = sub.add_parser("envoy", help="Render the Envoy config for a policy.")
    envoy_sub = envoy.add_subparsers(dest="envoy_command", required=True, metavar="ACTION")
    render = envoy_sub.add_parser(
        "render", help="Write the Envoy bootstrap for a policy (one cluster per policy cluster, routes per backend).",
        description="Write the Envoy bootstrap for a policy: the listener, early removal of client x-switchyard-* "
                    "headers, the ext_proc filter, one route per backend on the routing header, one cluster per "
                    "policy cluster, timeouts and the body limit (routing.max_body_bytes + room for the model rewrite).",
    )
    render.add_argument("--policy", type=Path, required=True, help="Policy YAML file.")
    render.add_argument("--backend", action="append", default=[], metavar="NAME=HOST:PORT",
                        help="Where a backend's cluster is (NAME: backend or cluster; HOST a DNS name or IP, or "
                             "unix:/PATH). Repeat for every cluster of the policy.")
    render.add_argument("--tls", action="append", default=[], metavar="NAME[=SNI]",
                        help="HTTPS to NAME's upstream, its certificate checked for SNI (default: its host).")
    render.add_argument("--ca-file", default="/etc/ssl/certs/ca-certificates.crt",
                        help="CA bundle for --tls upstreams (default /etc/ssl/certs/ca-certificates.crt).")
    render.add_argument("--credential", action="append", default=[], metavar="NAME=HEADER:FILE",
                        help="Envoy adds HEADER to every request to NAME, its value read from FILE (re-read when "
                             "FILE's directory changes); client authorization/api-key/x-api-key headers are removed.")
    render.add_argument("--credential-prefix", action="append", default=[], metavar="NAME=PREFIX",
                        help="Text before NAME's credential, e.g. 'large=Bearer ' for an Authorization header.")
    render.add_argument("--listen", default="127.0.0.1:10000", help="Envoy's listener (default 127.0.0.1:10000).")
    render.add_argument("--admin", default="127.0.0.1:9901", help="Envoy's admin endpoint (default 127.0.0.1:9901).")
    render.add_argument("--extproc", default=DEFAULT_EXTPROC_ADDRESS,
                        help=f"Where switchyard serves ext_proc: HOST:PORT or unix:/PATH (default {DEFAULT_EXTPROC_ADDRESS}).")
    render.add_argument("--ready", metavar="HOST:PORT",
                        help="Also listen here for GET /ready (Envoy's readiness) and GET /stats/prometheus.")
    render.add_argument("--no-access-log", action="store_true", help="No JSON access log on stdout.")
    render.add_argument("--fail-open", action="store_true",
                        help="When switchyard cannot answer (down, erroring, over ext_proc's message_timeout), send "
                             "the request to the policy's default backend, its model not rewritten, instead of "
                             "failing it with 500/504 (ext_proc failure_mode_allow). Client x-switchyard-* headers "
                             "are still removed before routing. Default: fail closed.")
    render.add_argument("--per-try-timeout", type=float, default=DEFAULT_PER_TRY_TIMEOUT_S, metavar="SECONDS",
                        help="Failover (policies with `fallbacks`): seconds one attempt may wait for its backend's "
                             "response headers before the next backend is tried. A non-streaming completion sends "
                             "its headers only when it is done, so keep it above the longest one; a stream already "
                             f"flowing is never cut by it (default {DEFAULT_PER_TRY_TIMEOUT_S:g}).")
    render.add_argument("--outlier", action="append", default=[], metavar="NAME=VALUE",
                        help="An outlier detection setting of every backend cluster (repeatable): "
                             + ", ".join(f"{f.name} (default {f.default:g})" for f in fields(OutlierDetection))
                             + ". Counts are answers in a row; times are seconds.")
    render.add_argument("--no-outlier-detection", action="store_true",
                        help="No outlier detection: Envoy never ejects a failing backend host (and "
                             "`serve --envoy-admin` learns nothing from ejections).")
    render.add_argument("--out", type=Path,
                        help="Write here (credential SDS files go beside it) instead of stdout.")
    render.set_defaults(handler=_render)


def _pairs(items: list[str], option: str, value_name: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise EnvoyConfigError(f"{option} must be NAME={value_name}, got {item!r}.")
        if name.strip() in out:
            raise EnvoyConfigError(f"{option} {name.strip()!r} is given twice.")
        out[name.strip()] = value
    return out


def _upstreams(args: argparse.Namespace) -> dict[str, Upstream]:
    addresses = _pairs(args.backend, "--backend", "HOST:PORT")
    tls = {name: sni or None for name, sni in _pairs([t if "=" in t else f"{t}=" for t in args.tls], "--tls", "SNI").items()}
    credentials = _pairs(args.credential, "--credential", "HEADER:FILE")
    prefixes = _pairs(args.credential_prefix, "--credential-prefix", "PREFIX")
    for option, names in (("--tls", tls), ("--credential", credentials), ("--credential-prefix", prefixes)):
        for name in names:
            if name not in addresses:
                raise EnvoyConfigError(f"{option} {name}: no --backend {name}=HOST:PORT is given.")
    for name in prefixes:
        if name not in credentials:
            raise EnvoyConfigError(f"--credential-prefix {name}: no --credential {name}=HEADER:FILE is given.")
    upstreams = {}
    for name, text in addresses.items():
        credential = None
        if name in credentials:
            header, sep, file = credentials[name].partition(":")
            if not sep or not header or not file:
                raise EnvoyConfigError(f"--credential must be NAME=HEADER:FILE, got {name}={credentials[name]!r}.")
            credential = Credential(header=header, file=file, prefix=prefixes.get(name, ""))
        upstreams[name] = Upstream(
            address=Address.parse(text, what=f"--backend {name}"), tls=name in tls, sni=tls.get(name),
            ca_file=args.ca_file, credential=credential,
        )
    return upstreams


def _outlier(args: argparse.Namespace) -> OutlierDetection | None:
    """The outlier detection of ``--outlier NAME=VALUE`` (the defaults for the rest), or ``None``."""
    if args.no_outlier_detection:
        if args.outlier:
            raise EnvoyConfigError("--outlier and --no-outlier-detection cannot be combined.")
        return None
    kinds = {f.name: type(f.default) for f in fields(OutlierDetection)}
    values: dict[str, float] = {}
    for name, text in _pairs(args.outlier, "--outlier", "VALUE").items():
        if name not in kinds:
            raise EnvoyConfigError(f"--outlier {name!r} is not a setting; use one of {', '.join(kinds)}.")
        try:
            values[name] = kinds[name](text)
        except ValueError:
            raise EnvoyConfigError(f"--outlier {name} must be a {kinds[name].__name__}, got {text!r}.") from None
    return OutlierDetection(**values)


def _render(args: argparse.Namespace) -> int:
    policy = load_policy(args.policy)
    options = EnvoyOptions(
        listen=Address.parse(args.listen, what="--listen"),
        admin=Address.parse(args.admin, what="--admin"),
        extproc=Address.parse(args.extproc, what="--extproc"),
        ready=Address.parse(args.ready, what="--ready") if args.ready else None,
        access_log=not args.no_access_log,
        fail_open=args.fail_open,
        outlier=_outlier(args),
        per_try_timeout_s=args.per_try_timeout,
        credentials_dir=str(args.out.resolve().parent) if args.out else None,
    )
    rendered = render_envoy(policy, _upstreams(args), options)
    header = f"Envoy bootstrap for the policy {args.policy}, written by `switchyard envoy render`: re-render it, do not edit."
    if args.fail_open:
        header += "\nFail-open (--fail-open): a request switchyard cannot answer goes to the default backend, unrouted."
    if args.out is None:
        sys.stdout.write(rendered.yaml(header))
    else:
        rendered.write(args.out, header)
    return 0
