"""The scorer kinds, one class each, as the signal kinds are declared in ``_signals``.

A kind declares itself once: ``kind``, ``doc``, its own ``keys`` (the policy schema's
``scorers.<name>`` entry and the scorers file derive from them, with the keys every kind
shares), how it turns its validated keys into its part of a :class:`ScorerSpec`, what it
checks against its checkpoint's description, the outputs it offers, and ``entry_point``: the
name its in-process loader registers under in the ``switchyard.scorers`` entry-point group
(``extproc.scorers._loaders``). Adding a kind is a class here and its loader.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar

from extproc._errors import ScorerError
from extproc._schema import Key, MapOf, Obj, Str, kind_key
from extproc.scorers._interface import RemoteConfig, ScorerDescription, ScorerSpec

__all__ = ["ScorerKind", "ProbeKind", "LatentRouterKind", "SCORER_KINDS", "scorer_kind", "scorer_schemas"]

#: ``report(key_path, message)`` records a problem at a key path.
Report = Callable[[tuple, str], None]
#: ``folder(raw, key_path)``: the absolute local checkpoint folder, or None (reported).
Folder = Callable[[str, tuple], "str | None"]


class ScorerKind:
    """Base class of scorer kinds."""

    kind: ClassVar[str]
    doc: ClassVar[str]
    #: The kind's own keys of ``scorers.<name>`` (the shared ones are the policy schema's).
    keys: ClassVar[dict[str, Key]]
    #: The name its in-process loader registers under in the ``switchyard.scorers`` group.
    entry_point: ClassVar[str]
    #: The key a problem reading its checkpoints is reported at.
    checkpoint_key: ClassVar[str]
    #: Whether ``route.utility`` rules may name a scorer of this kind.
    routes_utility: ClassVar[bool] = False

    def spec_fields(self, name: str, config: dict[str, Any], remote: RemoteConfig | None, folder: Folder,
                    backends: Mapping[str, Any] | None, report: Report) -> dict[str, Any] | None:
        """This kind's :class:`ScorerSpec` fields from its validated entry, or None (reported)
        when the entry names nothing to score with. ``backends``: the policy's (None for a
        scorers file)."""
        raise NotImplementedError

    def local_folders(self, spec: ScorerSpec) -> list[str]:
        """The checkpoint folders an in-process spec reads."""
        raise NotImplementedError

    def check_description(self, spec: ScorerSpec, described: ScorerDescription, report: Report) -> None:
        """Report what the checkpoints' description contradicts in the spec."""

    def outputs(self, spec: ScorerSpec) -> tuple[str, ...] | None:
        """The outputs the spec alone names (None: only its checkpoints or the remote service know)."""
        raise NotImplementedError


class ProbeKind(ScorerKind):
    kind: ClassVar[str] = "probe"
    doc: ClassVar[str] = (
        "Hidden-state probes (last-token, Attention Probe, ReLope) that share one backbone prefill; "
        "each output is P(small backend answers correctly)."
    )
    keys: ClassVar[dict[str, Key]] = {
        "checkpoints": Key(
            MapOf(Str(min_length=1), min_items=1),
            "Output name → probe checkpoint folder (relative to the policy file). All must be trained on "
            "the same backbone. Required unless `remote` is set.",
            None,
        ),
    }
    entry_point: ClassVar[str] = "probe"
    checkpoint_key: ClassVar[str] = "checkpoints"

    def spec_fields(self, name, config, remote, folder, backends, report):
        at = ("scorers", name)
        raw = config["checkpoints"] or {}
        if remote is None and not raw:
            report(at, f"Scorer `{name}` (probe) needs `checkpoints` (or `remote`).")
            return None
        if remote is not None:
            return {"checkpoints": tuple(raw.items())}  # names only: files are remote
        found = [(out, folder(path, at + ("checkpoints", out))) for out, path in raw.items()]
        return {"checkpoints": tuple((out, path) for out, path in found if path is not None)}

    def local_folders(self, spec):
        return [folder for _, folder in spec.checkpoints]

    def check_description(self, spec, described, report):
        backbones = {out: described.backbones.get(out) for out, _ in spec.checkpoints}
        first_out, first = next(iter(backbones.items()))
        for out, backbone in backbones.items():
            if backbone != first:
                report(("scorers", spec.name, "checkpoints", out),
                       f"Probe `{out}` was trained on backbone {backbone!r} but `{first_out}` on {first!r}; the "
                       f"probes of one scorer share one backbone prefill, so they must share the backbone.")

    def outputs(self, spec):
        return tuple(out for out, _ in spec.checkpoints) or None


class LatentRouterKind(ScorerKind):
    kind: ClassVar[str] = "latent_router"
    doc: ClassVar[str] = (
        "A LatentRouter checkpoint; outputs are each pool model's predicted quality, used by "
        "`route.utility` rules (quality − λ·cost) or `score` signals."
    )
    keys: ClassVar[dict[str, Key]] = {
        "checkpoint": Key(
            Str(min_length=1),
            "LatentRouter checkpoint folder (relative to the policy file). Required unless `remote` is set.",
            None,
        ),
        "backends": Key(
            MapOf(Str(min_length=1), min_items=1, name_pattern=r"^\S+$"),
            "Pool model name → the backend serving it. Every pool model must map to a backend.",
        ),
    }
    entry_point: ClassVar[str] = "latent_router"
    checkpoint_key: ClassVar[str] = "checkpoint"
    routes_utility: ClassVar[bool] = True

    def spec_fields(self, name, config, remote, folder, backends, report):
        at = ("scorers", name)
        if remote is None and config["checkpoint"] is None:
            report(at, f"Scorer `{name}` (latent_router) needs `checkpoint` (or `remote`).")
            return None
        checkpoint = config["checkpoint"] if remote is not None else folder(config["checkpoint"], at + ("checkpoint",))
        pool_backends = config["backends"] or {}
        if backends is not None:
            for model, backend in pool_backends.items():
                if backend not in backends:
                    report(at + ("backends", model),
                           f"`scorers.{name}.backends.{model}` names backend {backend!r}, which is not defined; "
                           f"defined: {', '.join(backends)}.")
        return {"checkpoint": checkpoint, "backends": tuple(pool_backends.items())}

    def local_folders(self, spec):
        return [spec.checkpoint] if spec.checkpoint is not None else []

    def check_description(self, spec, described, report):
        at = ("scorers", spec.name)
        mapped = dict(spec.backends)
        for model in described.pool:
            if model not in mapped:
                report(at + ("backends",), f"Pool model {model!r} of scorer `{spec.name}` has no backend; add it to "
                       f"`scorers.{spec.name}.backends`.")
        for model in mapped:
            if model not in described.pool:
                report(at + ("backends", model), f"Scorer `{spec.name}`'s checkpoint has no pool model {model!r}; "
                       f"its pool: {', '.join(described.pool)}.")

    def outputs(self, spec):
        return tuple(model for model, _ in spec.backends) or None


#: The scorer kinds by ``kind``, in the order the schema and the reference list them.
SCORER_KINDS: dict[str, ScorerKind] = {cls.kind: cls() for cls in (ProbeKind, LatentRouterKind)}


def scorer_kind(kind: str) -> ScorerKind:
    """The declaration of ``kind``; :class:`ScorerError` naming the supported kinds."""
    try:
        return SCORER_KINDS[kind]
    except KeyError:
        raise ScorerError(
            f"Unknown scorer kind {kind!r}; supported kinds: {', '.join(SCORER_KINDS)}."
        ) from None


def scorer_schemas(common: Mapping[str, Key]) -> dict[str, Obj]:
    """Each kind's ``scorers.<name>`` entry (``kind``, its own keys, then ``common``: the keys
    every kind shares) for the validator, the JSON Schema and the policy reference."""
    return {
        kind: Obj(title=kind, doc=declared.doc, keys={"kind": kind_key(kind), **declared.keys, **common})
        for kind, declared in SCORER_KINDS.items()
    }
