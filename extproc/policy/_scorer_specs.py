"""Building :class:`ScorerSpec` objects from a validated ``scorers`` section, and checking
what refers to them (``score`` signals, ``route.utility`` rules) against their checkpoints.

Checkpoints are described without torch (``ScorerLoader.describe``): their outputs, the
backbone each probe was trained on, calibrated thresholds, LatentRouter's pool. Every problem
is reported at the key it comes from, so ``policy check`` prints ``file:line:column``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Collection, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from extproc._contract import DEADLINE_MARGIN_MS, MESSAGE_TIMEOUT_MS
from extproc._errors import CheckpointError, ScorerError, scorer_message
from extproc.scorers._kinds import SCORER_KINDS, scorer_kind
from extproc.scorers._loaders import describe_scorer
from extproc.scorers._interface import (
    BatchConfig, BreakerConfig, ImageLimits, RemoteConfig, RemoteTls, ScorerDescription, ScorerSpec, pem_problem,
)

__all__ = ["build_scorer_specs", "check_score_signal", "check_utility_route", "checkpoint_fingerprint", "calibrate_hint"]

def calibrate_hint(folder: str, share: float) -> str:
    """The command that calibrates ``folder`` for ``share`` (probe threshold or LatentRouter λ)."""
    return f"switchyard calibrate --checkpoint {folder} --data <labelled.jsonl> --large-share {share:g}"


#: ``report(key_path, message)`` records a problem at a key path.
Report = Callable[[tuple, str], None]

#: A checkpoint's files: ``config.json`` is read whole for its digest (it holds the calibrated
#: thresholds, the hyperparameters and ``weights_sha256``); the weights file, too large to hash
#: on every reload check, counts by size and mtime.
_CONFIG_FILE, _WEIGHTS_FILE = "config.json", "model.safetensors"


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for chunk in iter(lambda: file.read(1 << 16), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _checkpoint_identity(folder: str) -> str:
    parts = []
    try:
        parts.append(_file_digest(Path(folder) / _CONFIG_FILE))
    except OSError:
        parts.append("-")
    try:
        stat = (Path(folder) / _WEIGHTS_FILE).stat()
        parts.append(f"{stat.st_size}:{stat.st_mtime_ns}")
    except OSError:
        parts.append("-")
    return f"{folder}:{':'.join(parts)}"


def checkpoint_fingerprint(folders: list[str]) -> str:
    """A short digest of the checkpoints' contents as far as a reload can tell cheaply: each
    ``config.json``'s bytes (a recalibration rewritten in place within one mtime tick, at the
    same size, still changes it) and each weights file's size and mtime (missing files count
    too). Taken before the files are read, so a change made while they are read shows at
    the next check."""
    return hashlib.sha256("\n".join(_checkpoint_identity(f) for f in folders).encode()).hexdigest()[:16]


def _folder(base_dir: Path, raw: str, key: tuple, report: Report, seen: dict[str, str] | None) -> str | None:
    """The absolute checkpoint folder, or None (reported) when it does not exist. ``seen``
    gets its fingerprint, missing or not, so a caller can tell when it changes."""
    path = (base_dir / raw).resolve()
    if seen is not None:
        seen[str(path)] = checkpoint_fingerprint([str(path)])
    if not path.is_dir():
        report(key, f"Checkpoint folder {str(path)!r} does not exist.")
        return None
    return str(path)


#: What each ``remote.tls`` file must hold (a kind of :func:`pem_problem`).
_PEM_KINDS = {"ca": "certificate", "cert": "certificate", "key": "private key"}


def _pem_file(base_dir: Path, raw: str, key: tuple, report: Report) -> str | None:
    """The absolute path of a readable PEM file of the kind ``key[-1]`` needs, or None (the
    problem reported)."""
    path = (base_dir / raw).resolve()
    what = f"`{'.'.join(key)}` file {str(path)!r}"
    try:
        head = path.read_bytes()[:1 << 16]
    except FileNotFoundError:
        report(key, f"{what} does not exist.")
        return None
    except OSError as exc:
        report(key, f"{what} cannot be read: {exc.strerror or exc}.")
        return None
    problem = pem_problem(head, _PEM_KINDS[key[-1]])
    if problem is not None:
        report(key, f"{what} {problem}.")
        return None
    return str(path)


def _remote(name: str, raw: dict[str, Any] | None, base_dir: Path, report: Report) -> RemoteConfig | None:
    """``scorers.<name>.remote`` as a :class:`RemoteConfig`; a TLS file problem is reported (the
    policy is then rejected) and the config still built, so what refers to the scorer is checked."""
    if not raw:
        return None
    tls = None
    if raw["tls"] is not None:
        at = ("scorers", name, "remote", "tls")
        files = {field: (_pem_file(base_dir, raw["tls"][field], at + (field,), report) or raw["tls"][field])
                 for field in ("ca", "cert", "key") if raw["tls"][field] is not None}
        try:
            tls = RemoteTls(server_name=raw["tls"]["server_name"], **files)
        except ValueError as exc:
            report(at, f"`scorers.{name}.remote.tls`: {exc}")
    return RemoteConfig(raw["target"], raw["scorer"], tls)


def _image_limits(name: str, raw: dict[str, Any], report: Report) -> ImageLimits:
    """``scorers.<name>.images`` as :class:`ImageLimits`; a bad ``allow_hosts`` entry is
    reported (the policy is then rejected) and the defaults used meanwhile."""
    values = {**raw, "allow_hosts": tuple(raw["allow_hosts"]), "fetch_timeout_ms": float(raw["fetch_timeout_ms"])}
    try:
        return ImageLimits(**values)
    except ValueError as exc:
        report(("scorers", name, "images", "allow_hosts"), f"`scorers.{name}`: {exc}")
        return ImageLimits()


def _spec(name: str, config: dict[str, Any], base_dir: Path, report: Report,
          backends: Mapping[str, Any] | None, seen: dict[str, str] | None) -> ScorerSpec | None:
    at = ("scorers", name)
    kind = scorer_kind(config["kind"])
    remote = _remote(name, config["remote"], base_dir, report)

    def folder(raw: str, key: tuple) -> str | None:
        return _folder(base_dir, raw, key, report, seen)

    fields = kind.spec_fields(name, config, remote, folder, backends, report)
    if fields is None:
        return None
    fallback = config["fallback"]
    if fallback is not None and backends is not None and fallback not in backends:
        report(at + ("fallback",), f"`scorers.{name}.fallback` names backend {fallback!r}, which is not defined; "
               f"defined: {', '.join(backends)}.")
    # A spec with problems is still built from what is valid (a missing folder is left out),
    # so what refers to it is checked too instead of reported as undefined; the problems
    # already reported reject the policy.
    batch, images = config["batch"], config["images"]
    spec = ScorerSpec(
        name=name,
        kind=kind.kind,
        **fields,
        device=config["device"],
        dtype=config["dtype"],
        batch=BatchConfig(batch["max_size"], float(batch["max_wait_ms"])),
        deadline_ms=float(config["deadline_ms"]),
        images=_image_limits(name, images, report),
        remote=remote,
        breaker=BreakerConfig(config["breaker"]["failures"], float(config["breaker"]["cool_off_ms"])),
        fallback=fallback,
    )
    local = kind.local_folders(spec) if remote is None else []
    return replace(spec, fingerprint=checkpoint_fingerprint(local)) if local else spec


def build_scorer_specs(section: Mapping[str, dict[str, Any]], base_dir: Path, report: Report,
                       backends: Mapping[str, Any] | None,
                       checkpoints: dict[str, str] | None = None,
                       ) -> tuple[dict[str, ScorerSpec], dict[str, ScorerDescription]]:
    """Specs for every valid entry of ``section``, and the descriptions of the local ones.

    ``backends``: the policy's backends (None for a scorer service's config, which has none).
    ``checkpoints``: when given, gets every local checkpoint folder named (existing or not)
    with its :func:`checkpoint_fingerprint` from before it was read.
    """
    specs: dict[str, ScorerSpec] = {}
    described: dict[str, ScorerDescription] = {}
    for name, config in section.items():
        spec = _spec(name, config, base_dir, report, backends, checkpoints)
        if spec is None:
            continue
        specs[name] = spec
        _check_deadline(spec, report)
        if spec.remote is not None or not (spec.checkpoints or spec.checkpoint):
            continue  # remote: nothing local to read; no valid folder: already reported
        try:
            description = describe_scorer(spec)
        except (CheckpointError, ScorerError) as exc:
            key = ("scorers", name, scorer_kind(spec.kind).checkpoint_key)
            report(key, scorer_message(name, exc))
            continue
        described[name] = description
        scorer_kind(spec.kind).check_description(spec, description, report)
    return specs, described


def _check_deadline(spec: ScorerSpec, report: Report) -> None:
    """A deadline must leave Envoy's ``message_timeout`` the margin switchyard needs to answer
    with the fallback after it (``extproc._contract.DEADLINE_MARGIN_MS``)."""
    limit = MESSAGE_TIMEOUT_MS - DEADLINE_MARGIN_MS
    if spec.deadline_ms > limit:
        report(("scorers", spec.name, "deadline_ms"),
               f"`scorers.{spec.name}.deadline_ms` ({spec.deadline_ms:g}) must be below the shipped Envoy ext_proc "
               f"message_timeout ({MESSAGE_TIMEOUT_MS} ms) by at least {DEADLINE_MARGIN_MS} ms, the margin switchyard "
               f"keeps to answer with the fallback after a missed deadline: at most {limit} ms, or Envoy answers 504 "
               f"instead.")


def _outputs(spec: ScorerSpec, described: Mapping[str, ScorerDescription]) -> tuple[str, ...] | None:
    """The scorer's outputs, when known here (None: a remote scorer whose outputs are unknown)."""
    if spec.name in described:
        return described[spec.name].outputs
    return scorer_kind(spec.kind).outputs(spec)


def check_score_signal(signal: Any, scorers: Mapping[str, ScorerSpec],
                       described: Mapping[str, ScorerDescription], report: Report,
                       defined: Collection[str] = ()) -> None:
    """Resolve a ``score`` signal's output and calibrated threshold; report what is wrong.

    ``defined``: every scorer name the policy defines, including those whose entries have
    problems (already reported, so a signal using one is not checked further)."""
    if getattr(signal, "kind", None) != "score":
        return
    spec = scorers.get(signal.scorer)
    if spec is None:
        if signal.scorer not in defined:
            names = list(defined) or list(scorers)
            report(("scorer",), f"Signal `{signal.name}` uses scorer {signal.scorer!r}, which is not defined; "
                   f"defined: {', '.join(names) or 'none'}.")
        return
    if spec.remote is None and spec.name not in described:
        return  # its checkpoints could not be read: reported at `scorers.<name>`, nothing to check against
    outputs = _outputs(spec, described)
    if signal.output is None:
        if outputs is None or len(outputs) != 1:
            report((), f"Signal `{signal.name}` needs `output`: scorer `{spec.name}` has "
                   f"{'several outputs: ' + ', '.join(outputs) if outputs else 'outputs only known remotely'}.")
            return
        signal.output = outputs[0]
    elif outputs is not None and signal.output not in outputs:
        report(("output",), f"Scorer `{spec.name}` has no output {signal.output!r}; it has {', '.join(outputs)}.")
        return
    if signal.large_share is not None:
        if spec.name not in described:
            report(("large_share",), f"`large_share` needs the checkpoint's calibration, which is read from local "
                   f"checkpoints; scorer `{spec.name}` is remote: use `above` with the calibrated threshold.")
            return
        thresholds = described[spec.name].thresholds.get(signal.output, {})
        match = next((t for share, t in thresholds.items() if abs(share - signal.large_share) < 1e-9), None)
        if match is None:
            have = ", ".join(f"{share:g}" for share in thresholds) or "none"
            folder = dict(spec.checkpoints).get(signal.output, "<checkpoint>")
            report(("large_share",), f"Checkpoint `{signal.output}` of scorer `{spec.name}` carries no calibration "
                   f"for large share {signal.large_share:g} (it has: {have}); run `{calibrate_hint(folder, signal.large_share)}`.")
            return
        signal.at_least = float(match)


def check_utility_route(raw: dict[str, Any], scorers: Mapping[str, ScorerSpec],
                        described: Mapping[str, ScorerDescription], backends: Mapping[str, Any], report: Report,
                        defined: Collection[str] = ()):
    """The :class:`UtilityRoute` of a rule's ``route``, or None (problems reported).
    ``defined``: as for :func:`check_score_signal`."""
    from extproc.policy._model import UtilityRoute

    spec = scorers.get(raw["utility"])
    if spec is None and raw["utility"] in defined:
        return None  # its entry has problems, already reported
    if spec is None or not _routes_utility(spec):
        known = ", ".join(n for n, s in scorers.items() if _routes_utility(s)) or "none"
        kinds = " or ".join(k for k, declared in SCORER_KINDS.items() if declared.routes_utility)
        report(("utility",), f"`route.utility` must name a {kinds} scorer, got {raw['utility']!r}; defined: {known}.")
        return None
    mapped = {backend for _, backend in spec.backends}
    among = tuple(raw["among"]) if raw["among"] is not None else tuple(b for b in backends if b in mapped)
    ok = True
    for i, backend in enumerate(among):
        if backend not in backends:
            report(("among", i), f"`route.among[{i}]` names backend {backend!r}, which is not defined.")
            ok = False
        elif backend not in mapped:
            report(("among", i), f"`route.among[{i}]` names backend {backend!r}, which no pool model of scorer "
                   f"`{spec.name}` maps to; mapped: {', '.join(sorted(mapped)) or 'none'}.")
            ok = False
    lam = _route_lambda(raw, spec, described, report)
    return UtilityRoute(spec.name, lam, among, spec.backends) if ok and lam is not None else None


def _routes_utility(spec: ScorerSpec) -> bool:
    return scorer_kind(spec.kind).routes_utility


def _route_lambda(raw: dict[str, Any], spec: ScorerSpec, described: Mapping[str, ScorerDescription],
                  report: Report) -> float | None:
    """The route's λ: ``lambda`` as written, or the checkpoint's λ calibrated for ``large_share``."""
    share = raw.get("large_share")
    if (raw["lambda"] is None) == (share is None):
        report((), "`route` needs exactly one of `lambda` and `large_share`.")
        return None
    if share is None:
        return float(raw["lambda"])
    if spec.name not in described:
        if spec.remote is not None:
            report(("large_share",), f"`large_share` needs the checkpoint's calibration, which is read from local "
                   f"checkpoints; scorer `{spec.name}` is remote: use `lambda` with the calibrated value.")
        return None  # its checkpoint could not be read: reported at `scorers.<name>`
    lambdas = described[spec.name].lambdas
    match = next((lam for s, (lam, _) in lambdas.items() if abs(s - share) < 1e-9), None)
    if match is None:
        have = ", ".join(f"{s:g}" for s in lambdas) or "none"
        report(("large_share",), f"The checkpoint of scorer `{spec.name}` carries no λ calibrated for large share "
               f"{share:g} (it has: {have}); run `{calibrate_hint(spec.checkpoint or '<checkpoint>', share)}`.")
        return None
    return float(match)
