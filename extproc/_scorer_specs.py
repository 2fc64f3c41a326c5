"""Building :class:`ScorerSpec` objects from a validated ``scorers`` section, and checking
what refers to them (``score`` signals, ``route.utility`` rules) against their checkpoints.

Checkpoints are described without torch (``ScorerLoader.describe``): their outputs, the
backbone each probe was trained on, calibrated thresholds, LatentRouter's pool. Every problem
is reported at the key it comes from, so ``policy check`` prints ``file:line:column``.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from extproc._errors import CheckpointError, ScorerError
from extproc._scorer_loading import describe_scorer
from extproc._scorers import BatchConfig, ImageLimits, RemoteConfig, RemoteTls, ScorerDescription, ScorerSpec

__all__ = ["build_scorer_specs", "check_score_signal", "check_utility_route", "checkpoint_fingerprint"]

#: ``report(key_path, message)`` records a problem at a key path.
Report = Callable[[tuple, str], None]

#: Files whose size and mtime identify a checkpoint's contents (a replaced checkpoint reloads).
_IDENTITY_FILES = ("config.json", "model.safetensors")


def checkpoint_fingerprint(folders: list[str]) -> str:
    """A short digest of the checkpoint files' sizes and mtimes (missing files count too)."""
    parts = []
    for folder in folders:
        for name in _IDENTITY_FILES:
            try:
                stat = (Path(folder) / name).stat()
                parts.append(f"{folder}/{name}:{stat.st_size}:{stat.st_mtime_ns}")
            except OSError:
                parts.append(f"{folder}/{name}:-")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def _folder(base_dir: Path, raw: str, key: tuple, report: Report) -> str | None:
    path = (base_dir / raw).resolve()
    if not path.is_dir():
        report(key, f"Checkpoint folder {str(path)!r} does not exist.")
        return None
    return str(path)


#: What each ``remote.tls`` file must hold: a PEM block whose BEGIN line ends so.
_PEM_KINDS = {"ca": ("certificate", b"CERTIFICATE-----"), "cert": ("certificate", b"CERTIFICATE-----"),
              "key": ("private key", b"PRIVATE KEY-----")}


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
    kind, ending = _PEM_KINDS[key[-1]]
    if re.search(rb"^-----BEGIN [A-Z0-9 ]*" + re.escape(ending), head, re.MULTILINE) is None:
        report(key, f"{what} holds no PEM {kind} (no `-----BEGIN ...{ending.decode()}` line).")
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


def _spec(name: str, config: dict[str, Any], base_dir: Path, report: Report,
          backends: Mapping[str, Any] | None) -> ScorerSpec | None:
    at = ("scorers", name)
    kind = config["kind"]
    remote = _remote(name, config["remote"], base_dir, report)
    checkpoints: tuple[tuple[str, str], ...] = ()
    checkpoint = None
    if kind == "probe":
        raw = config["checkpoints"] or {}
        if remote is None and not raw:
            report(at, f"Scorer `{name}` (probe) needs `checkpoints` (or `remote`).")
            return None
        if remote is None:
            found = [(out, _folder(base_dir, folder, at + ("checkpoints", out), report)) for out, folder in raw.items()]
            checkpoints = tuple((out, folder) for out, folder in found if folder is not None)
        else:
            checkpoints = tuple((out, folder) for out, folder in raw.items())  # names only: files are remote
    else:
        if remote is None and config["checkpoint"] is None:
            report(at, f"Scorer `{name}` (latent_router) needs `checkpoint` (or `remote`).")
            return None
        if remote is None:
            checkpoint = _folder(base_dir, config["checkpoint"], at + ("checkpoint",), report)
        else:
            checkpoint = config["checkpoint"]
        pool_backends = config["backends"] or {}
        if backends is not None:
            for model, backend in pool_backends.items():
                if backend not in backends:
                    report(at + ("backends", model),
                           f"`scorers.{name}.backends.{model}` names backend {backend!r}, which is not defined; "
                           f"defined: {', '.join(backends)}.")
    # A spec with problems is still built from what is valid (a missing folder is left out),
    # so what refers to it is checked too instead of reported as undefined; the problems
    # already reported reject the policy.
    batch, images = config["batch"], config["images"]
    local = [folder for _, folder in checkpoints] if remote is None else []
    if remote is None and checkpoint is not None:
        local.append(checkpoint)
    return ScorerSpec(
        name=name,
        kind=kind,
        checkpoints=checkpoints,
        checkpoint=checkpoint,
        backends=tuple((config.get("backends") or {}).items()),
        device=config["device"],
        dtype=config["dtype"],
        batch=BatchConfig(batch["max_size"], float(batch["max_wait_ms"])),
        deadline_ms=float(config["deadline_ms"]),
        images=ImageLimits(images["max_bytes"], images["max_pixels"], tuple(images["allow_hosts"]),
                           float(images["fetch_timeout_ms"])),
        remote=remote,
        fingerprint=checkpoint_fingerprint(local) if local else "",
    )


def _check_description(spec: ScorerSpec, described: ScorerDescription, report: Report) -> None:
    at = ("scorers", spec.name)
    if spec.kind == "probe":
        backbones = {out: described.backbones.get(out) for out, _ in spec.checkpoints}
        first_out, first = next(iter(backbones.items()))
        for out, backbone in backbones.items():
            if backbone != first:
                report(at + ("checkpoints", out),
                       f"Probe `{out}` was trained on backbone {backbone!r} but `{first_out}` on {first!r}; the "
                       f"probes of one scorer share one backbone prefill, so they must share the backbone.")
    else:
        mapped = dict(spec.backends)
        for model in described.pool:
            if model not in mapped:
                report(at + ("backends",), f"Pool model {model!r} of scorer `{spec.name}` has no backend; add it to "
                       f"`scorers.{spec.name}.backends`.")
        for model in mapped:
            if model not in described.pool:
                report(at + ("backends", model), f"Scorer `{spec.name}`'s checkpoint has no pool model {model!r}; "
                       f"its pool: {', '.join(described.pool)}.")


def build_scorer_specs(section: Mapping[str, dict[str, Any]], base_dir: Path, report: Report,
                       backends: Mapping[str, Any] | None) -> tuple[dict[str, ScorerSpec], dict[str, ScorerDescription]]:
    """Specs for every valid entry of ``section``, and the descriptions of the local ones.

    ``backends``: the policy's backends (None for a scorer service's config, which has none).
    """
    from extproc._envoy_limits import MESSAGE_TIMEOUT_MS

    specs: dict[str, ScorerSpec] = {}
    described: dict[str, ScorerDescription] = {}
    for name, config in section.items():
        spec = _spec(name, config, base_dir, report, backends)
        if spec is None:
            continue
        specs[name] = spec
        if spec.deadline_ms >= MESSAGE_TIMEOUT_MS:
            report(("scorers", name, "deadline_ms"),
                   f"`scorers.{name}.deadline_ms` ({spec.deadline_ms:g}) must be below the shipped Envoy "
                   f"ext_proc message_timeout ({MESSAGE_TIMEOUT_MS} ms), or Envoy answers 504 before the fallback.")
        if spec.remote is not None or not (spec.checkpoints or spec.checkpoint):
            continue  # remote: nothing local to read; no valid folder: already reported
        try:
            description = describe_scorer(spec)
        except (CheckpointError, ScorerError) as exc:
            key = ("scorers", name, "checkpoints" if spec.kind == "probe" else "checkpoint")
            report(key, f"Scorer `{name}`: {exc}")
            continue
        described[name] = description
        _check_description(spec, description, report)
    return specs, described


def _outputs(spec: ScorerSpec, described: Mapping[str, ScorerDescription]) -> tuple[str, ...] | None:
    """The scorer's outputs, when known here (None: a remote scorer whose outputs are unknown)."""
    if spec.name in described:
        return described[spec.name].outputs
    if spec.kind == "probe" and spec.checkpoints:
        return tuple(out for out, _ in spec.checkpoints)
    if spec.kind == "latent_router" and spec.backends:
        return tuple(model for model, _ in spec.backends)
    return None


def check_score_signal(signal: Any, scorers: Mapping[str, ScorerSpec],
                       described: Mapping[str, ScorerDescription], report: Report) -> None:
    """Resolve a ``score`` signal's output and calibrated threshold; report what is wrong."""
    if getattr(signal, "kind", None) != "score":
        return
    spec = scorers.get(signal.scorer)
    if spec is None:
        report(("scorer",), f"Signal `{signal.name}` uses scorer {signal.scorer!r}, which is not defined; "
               f"defined: {', '.join(scorers) or 'none'}.")
        return
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
            report(("large_share",), f"Checkpoint `{signal.output}` of scorer `{spec.name}` carries no calibration "
                   f"for large share {signal.large_share:g} (it has: {have}); run `switchyard calibrate --share "
                   f"{signal.large_share:g}`.")
            return
        signal.at_least = float(match)


def check_utility_route(raw: dict[str, Any], scorers: Mapping[str, ScorerSpec],
                        described: Mapping[str, ScorerDescription], backends: Mapping[str, Any], report: Report):
    """The :class:`UtilityRoute` of a rule's ``route``, or None (problems reported)."""
    from extproc._policy import UtilityRoute

    spec = scorers.get(raw["utility"])
    if spec is None or spec.kind != "latent_router":
        known = ", ".join(n for n, s in scorers.items() if s.kind == "latent_router") or "none"
        report(("utility",), f"`route.utility` must name a latent_router scorer, got {raw['utility']!r}; defined: {known}.")
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
    return UtilityRoute(spec.name, float(raw["lambda"]), among, spec.backends) if ok else None
