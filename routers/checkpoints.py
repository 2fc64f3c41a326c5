"""Checkpoints of the learned scorers, probes and LatentRouter: one folder, one format.

    ckpt/relope/
        config.json          what the model is; read without torch by read_config()
        model.safetensors    what was trained (never backbone weights)

``config.json`` (``format_version`` 1)::

    kind              last_token | attention | relope | latent_router
    backbone          the backbone read (probes; LatentRouter with the ``backbone`` encoder):
                      path, layer, model_type, hidden_size, num_layers, fingerprint (weights
                      of the embeddings and that layer), model_fingerprint (embeddings and
                      layer 1: the same for every layer)
    truncation        {max_tokens, head}: how long prompts were cut (routers.truncation);
                      scoring cuts them the same way
    probe             probe hyperparameters (probes)
    encoder, model,   LatentRouter: the query encoder, LatentRouterConfig, the pool (names,
    pool              mean costs, cost scale, profiles)
    target, large     probes: what the score predicts (PROBE_TARGETS): ``small_ok`` (default;
                      high = the small model will do) or ``gain`` (high = the large
                      backend ``large`` does better)
    thresholds        probes: [{large_share, threshold, large_when, achieved_share, data,
                      data_hash, n}] written by ``switchyard calibrate``; ``large_when`` is
                      ``below`` (small_ok) or ``above`` (gain): where the large share scores
    lambdas           LatentRouter: [{large_share, lambda, large, achieved_share, data,
                      data_hash, n}] written by ``switchyard calibrate``: the λ that sends
                      that share of requests to the ``large`` pool model
    validation.jsonl  the held-out validation rows, when training held some out
    training          how it was trained: settings, data hashes, validation split, history
    weights_sha256    sha256 of model.safetensors, checked on load

Runtime settings (device, dtype, batch limits) are never saved: the policy or the command line
gives them. Loading checks that the backbone given is the one a probe was trained on (same
architecture and weights fingerprint; the path may differ).

Writes are atomic: a new checkpoint is written to a hidden sibling folder, flushed, then
swapped in by one rename (an atomic exchange on Linux), so a reader finds the old checkpoint
or the new one, never a half-written one; ``weights_sha256`` also catches a weights file
that does not belong to its config. Only the loaders import torch.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import math
import os
import shutil
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from extproc import CheckpointError
from routers.truncation import Truncation

__all__ = [
    "CONFIG_FILE",
    "WEIGHTS_FILE",
    "FORMAT_VERSION",
    "PROBE_KINDS",
    "LATENT_ROUTER_KIND",
    "BackboneIdentity",
    "Threshold",
    "LambdaCalibration",
    "PROBE_TARGETS",
    "VALIDATION_FILE",
    "PoolModel",
    "CheckpointConfig",
    "ProbeCheckpoint",
    "read_config",
    "read_raw_config",
    "read_checkpoint",
    "save_probe",
    "load_probe",
    "check_backbone",
    "load_backbone",
    "store_threshold",
    "store_lambda",
    "save_latent_router",
    "load_latent_router",
]

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
#: The held-out validation rows training writes next to the weights (labelled JSONL).
VALIDATION_FILE = "validation.jsonl"
#: What a probe's score predicts: P(the small model is good enough) or the large model's gain.
PROBE_TARGETS = ("small_ok", "gain")
FORMAT_VERSION = 1
#: Probe checkpoint kinds (the keys of :data:`routers.probes.PROBE_KINDS`, here without torch).
PROBE_KINDS = ("last_token", "attention", "relope")
LATENT_ROUTER_KIND = "latent_router"
#: What a probe checkpoint's one output is called (its P(small model answers correctly)).
PROBE_OUTPUT = "score"
_MATCHED = ("model_type", "hidden_size", "num_layers", "layer", "fingerprint")
_LATENT_SECTIONS = (
    "kind", "format_version", "encoder", "model", "pool", "backbone", "truncation", "weights_sha256", "lambdas",
)


@dataclass(frozen=True)
class BackboneIdentity:
    """Which backbone a checkpoint read: where it was, its shape and weights fingerprints.

    ``fingerprint`` covers the embeddings and layer ``layer``; ``model_fingerprint`` the
    embeddings and layer 1, so it is the same for probes at different layers of one model
    (``None`` in checkpoints written before it existed).
    """

    path: str
    layer: int
    model_type: str
    hidden_size: int
    num_layers: int
    fingerprint: str
    model_fingerprint: str | None = None

    @property
    def key(self) -> str:
        """Identifies the model (not the layer): ``model_fingerprint``, else the path."""
        return self.model_fingerprint or self.path


@dataclass(frozen=True)
class Threshold:
    """A calibrated probe threshold: requests scoring below ``threshold`` go to the large
    model, ``large_share`` of the calibration set (``achieved_share`` measured)."""

    large_share: float
    threshold: float
    achieved_share: float | None = None
    data: str | None = None
    data_hash: str | None = None
    n: int | None = None
    #: ``below``: requests scoring below ``threshold`` go to the large model (``small_ok``
    #: probes); ``above``: those scoring at or above it (``gain`` probes).
    large_when: str = "below"


@dataclass(frozen=True)
class LambdaCalibration:
    """A calibrated LatentRouter cost weight: at ``lam``, ``large_share`` of the calibration
    set goes to pool model ``large`` (``achieved_share`` measured)."""

    large_share: float
    lam: float
    large: str
    achieved_share: float | None = None
    data: str | None = None
    data_hash: str | None = None
    n: int | None = None


@dataclass(frozen=True)
class PoolModel:
    """A LatentRouter pool model: its mean training cost and the normalised cost its
    utility uses (``quality − λ·cost_normalised``; the priciest model has 1)."""

    name: str
    mean_cost: float
    cost_normalised: float


@dataclass(frozen=True)
class CheckpointConfig:
    """A checkpoint's ``config.json``, parsed and checked, without torch or weights.

    - ``kind``: ``last_token``, ``attention``, ``relope`` or ``latent_router``;
      :attr:`scorer_kind` is the policy's scorer kind (``probe`` or ``latent_router``).
    - ``backbone``: the backbone read (``None`` for LatentRouter's text/hashing encoders).
    - ``truncation``: how prompts are cut; :attr:`max_tokens` is its limit. ``None`` for
      the hashing encoder (it reads no tokens) and for checkpoints written before it was
      recorded (scored with the default, capped by the model's limit).
    - ``thresholds``: calibrated thresholds (probes), in the order stored.
    - ``pool``: LatentRouter's pool models, in the router's order.
    - ``encoder``: LatentRouter's query encoder spec (kind, model, dim, max_length, layer).
    - ``model``: the probe's or LatentRouter's hyperparameters, as saved.
    - ``training``: how it was trained (settings, data hashes, validation, history).
    - ``weights_sha256``: the weights file's sha256 (``None`` in older checkpoints).
    - ``raw``: the whole ``config.json`` as read (read-only at the top level).
    """

    folder: Path
    kind: str
    backbone: BackboneIdentity | None
    truncation: Truncation | None
    thresholds: tuple[Threshold, ...] = ()
    lambdas: tuple[LambdaCalibration, ...] = ()
    pool: tuple[PoolModel, ...] = ()
    encoder: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    model: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    training: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    weights_sha256: str | None = None
    raw: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}), repr=False)

    @property
    def scorer_kind(self) -> str:
        """``probe`` or ``latent_router``: the policy's ``scorers.<name>.kind``."""
        return "probe" if self.kind in PROBE_KINDS else LATENT_ROUTER_KIND

    @property
    def outputs(self) -> tuple[str, ...]:
        """A probe: one output, ``score`` (the policy names it after its ``checkpoints`` key);
        LatentRouter: one predicted quality per pool model, named after it."""
        return (PROBE_OUTPUT,) if self.kind in PROBE_KINDS else tuple(m.name for m in self.pool)

    @property
    def target(self) -> str | None:
        """A probe's target (:data:`PROBE_TARGETS`; ``small_ok`` when not recorded); ``None``
        for LatentRouter."""
        return self.raw.get("target", "small_ok") if self.kind in PROBE_KINDS else None

    @property
    def large(self) -> str | None:
        """The large backend a ``gain`` probe was trained against (else ``None``)."""
        return self.raw.get("large") if self.kind in PROBE_KINDS else None

    @property
    def max_tokens(self) -> int | None:
        return None if self.truncation is None else self.truncation.max_tokens

    @property
    def layer(self) -> int:
        """The probe layer (probes; LatentRouter with the ``backbone`` encoder)."""
        if self.backbone is None:
            raise CheckpointError(f"{self.folder} reads no backbone layer.")
        return self.backbone.layer

    @property
    def costs(self) -> dict[str, float]:
        """LatentRouter: pool model -> normalised cost."""
        return {m.name: m.cost_normalised for m in self.pool}

    @property
    def large_shares(self) -> tuple[float, ...]:
        return tuple(t.large_share for t in self.thresholds)

    def threshold(self, large_share: float | None = None) -> float:
        """The calibrated threshold for ``large_share`` (default: the last one stored)."""
        if not self.thresholds:
            raise CheckpointError(
                f"{self.folder} has no calibrated threshold; run `switchyard calibrate --checkpoint {self.folder} "
                "--data <labelled.jsonl> --large-share 0.2`."
            )
        if large_share is None:
            return self.thresholds[-1].threshold
        for entry in self.thresholds:
            if abs(entry.large_share - large_share) < 1e-9:
                return entry.threshold
        shares = ", ".join(f"{s:g}" for s in self.large_shares)
        raise CheckpointError(f"{self.folder} has no threshold for large share {large_share:g}; it has {shares}.")

    def to_json(self) -> dict[str, Any]:
        """A deep copy of the ``config.json`` object this was read from."""
        return json.loads(json.dumps(dict(self.raw)))


#: The name earlier versions exported for a probe checkpoint's parsed config.
ProbeCheckpoint = CheckpointConfig


# ---- reading (no torch) -----------------------------------------------------------------


def read_raw_config(folder: str | Path) -> dict[str, Any]:
    """The JSON object in ``folder/config.json``, unchecked; :class:`CheckpointError` if the
    file is missing, unreadable or not a JSON object."""
    folder = Path(folder)
    path = folder / CONFIG_FILE
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise CheckpointError(f"No checkpoint at {folder}: {path} does not exist.") from exc
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}.") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"Cannot read {path}: {exc}.") from exc
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(config).__name__}.")
    return config


def _frozen(value: Any) -> Mapping[str, Any]:
    return MappingProxyType(dict(value or {}))


def _number(value: Any, where: str, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise CheckpointError(f"{where} must be a finite number, got {value!r}.")
    if positive and value <= 0:
        raise CheckpointError(f"{where} must be > 0, got {value!r}.")
    return float(value)


def _section(data: Mapping[str, Any], key: str, path: Path) -> dict[str, Any]:
    value = data.get(key)
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: `{key}` must be an object, got {type(value).__name__}.")
    return value


def _backbone(raw: Any, path: Path) -> BackboneIdentity:
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: `backbone` must be an object, got {type(raw).__name__}.")
    missing = [k for k in ("path", *_MATCHED) if k not in raw]
    if missing:
        raise CheckpointError(f"{path}: `backbone` lacks {', '.join(missing)}.")
    try:
        return BackboneIdentity(
            path=str(raw["path"]),
            layer=int(raw["layer"]),
            model_type=str(raw["model_type"]),
            hidden_size=int(raw["hidden_size"]),
            num_layers=int(raw["num_layers"]),
            fingerprint=str(raw["fingerprint"]),
            model_fingerprint=None if raw.get("model_fingerprint") is None else str(raw["model_fingerprint"]),
        )
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: bad `backbone` section: {exc}") from exc


def _truncation(raw: Any, path: Path) -> Truncation | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: `truncation` must be an object, got {type(raw).__name__}.")
    try:
        return Truncation.from_dict(raw)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: bad `truncation` section: {exc}") from exc


def _calibrations(raw: Any, path: Path, key: str) -> Iterator[tuple[str, dict[str, Any], float]]:
    """Each entry of a calibration list (`thresholds`, `lambdas`) with where it is (for
    errors) and its checked ``large_share``."""
    if raw is None:
        return
    if not isinstance(raw, list):
        raise CheckpointError(f"{path}: `{key}` must be a list, got {type(raw).__name__}.")
    for i, entry in enumerate(raw):
        where = f"{path}: `{key}[{i}]"
        if not isinstance(entry, dict):
            raise CheckpointError(f"{where}` must be an object.")
        share = _number(entry.get("large_share"), f"{where}.large_share`")
        if not 0.0 <= share <= 1.0:
            raise CheckpointError(f"{where}.large_share` must be in [0, 1], got {share!r}.")
        yield where, entry, share


def _thresholds(raw: Any, path: Path) -> tuple[Threshold, ...]:
    out = []
    for where, entry, share in _calibrations(raw, path, "thresholds"):
        achieved = entry.get("achieved_share")
        n = entry.get("n")
        large_when = entry.get("large_when", "below")
        if large_when not in ("below", "above"):
            raise CheckpointError(f"{where}.large_when` must be 'below' or 'above', got {large_when!r}.")
        out.append(
            Threshold(
                large_when=large_when,
                large_share=share,
                threshold=_number(entry.get("threshold"), f"{where}.threshold`"),
                achieved_share=None if achieved is None else _number(achieved, f"{where}.achieved_share`"),
                data=None if entry.get("data") is None else str(entry["data"]),
                data_hash=None if entry.get("data_hash") is None else str(entry["data_hash"]),
                n=n if isinstance(n, int) and not isinstance(n, bool) else None,
            )
        )
    return tuple(out)


def _lambdas(raw: Any, path: Path, names: Sequence[str]) -> tuple[LambdaCalibration, ...]:
    out = []
    for where, entry, share in _calibrations(raw, path, "lambdas"):
        lam = _number(entry.get("lambda"), f"{where}.lambda`")
        if lam < 0:
            raise CheckpointError(f"{where}.lambda` must be >= 0, got {lam!r}.")
        if entry.get("large") not in names:
            raise CheckpointError(f"{where}.large` must name a pool model ({', '.join(names)}), got {entry.get('large')!r}.")
        achieved, n = entry.get("achieved_share"), entry.get("n")
        out.append(LambdaCalibration(
            large_share=share, lam=lam, large=entry["large"],
            achieved_share=None if achieved is None else _number(achieved, f"{where}.achieved_share`"),
            data=None if entry.get("data") is None else str(entry["data"]),
            data_hash=None if entry.get("data_hash") is None else str(entry["data_hash"]),
            n=n if isinstance(n, int) and not isinstance(n, bool) else None,
        ))
    return tuple(out)


def _target(data: Mapping[str, Any], path: Path) -> None:
    target = data.get("target", "small_ok")
    if target not in PROBE_TARGETS:
        raise CheckpointError(f"{path}: `target` must be one of {', '.join(PROBE_TARGETS)}, got {target!r}.")
    if target == "gain" and not (isinstance(data.get("large"), str) and data["large"]):
        raise CheckpointError(f"{path}: a `gain` probe needs `large`, the large backend's name, got {data.get('large')!r}.")


def _pool(raw: dict[str, Any], path: Path) -> tuple[PoolModel, ...]:
    names, costs = raw.get("names"), raw.get("mean_cost")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise CheckpointError(f"{path}: `pool.names` must be a non-empty list of strings.")
    if len(set(names)) != len(names):
        raise CheckpointError(f"{path}: `pool.names` has duplicates: {names}.")
    if not isinstance(costs, list) or len(costs) != len(names):
        raise CheckpointError(f"{path}: `pool.mean_cost` must hold one number per pool model ({len(names)}).")
    scale = _number(raw.get("cost_scale"), f"{path}: `pool.cost_scale`", positive=True)
    return tuple(
        PoolModel(name, cost, cost / scale)
        for name, cost in zip(names, (_number(c, f"{path}: `pool.mean_cost`") for c in costs), strict=True)
    )


def read_config(folder: str | Path) -> CheckpointConfig:
    """Parse and check ``folder/config.json`` of any scorer checkpoint, without torch.

    :class:`CheckpointError` naming the file and the field on a missing folder, bad JSON,
    an unknown ``kind`` or ``format_version``, or a malformed section.
    """
    folder = Path(folder)
    path = folder / CONFIG_FILE
    data = read_raw_config(folder)
    kind = data.get("kind")
    if kind not in (*PROBE_KINDS, LATENT_ROUTER_KIND):
        supported = ", ".join((*PROBE_KINDS, LATENT_ROUTER_KIND))
        raise CheckpointError(f"{path}: `kind` must be one of {supported}, got {kind!r}.")
    if data.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: unsupported `format_version` {data.get('format_version')!r}; this switchyard reads {FORMAT_VERSION}."
        )
    sha = data.get("weights_sha256")
    common = {
        "folder": folder,
        "kind": kind,
        "weights_sha256": None if sha is None else str(sha),
        "raw": MappingProxyType(data),
    }
    if kind in PROBE_KINDS:
        _target(data, path)
        return CheckpointConfig(
            **common,
            backbone=_backbone(data.get("backbone"), path),
            truncation=_truncation(data.get("truncation"), path),
            thresholds=_thresholds(data.get("thresholds"), path),
            model=_frozen(_section(data, "probe", path)),
            training=_frozen(data.get("training")),
        )
    encoder = _section(data, "encoder", path)
    if not isinstance(encoder.get("kind"), str):
        raise CheckpointError(f"{path}: `encoder.kind` must be a string, got {encoder.get('kind')!r}.")
    # checkpoints written before `training` kept its entries at the top level
    training = data.get("training")
    if training is None:
        training = {k: v for k, v in data.items() if k not in _LATENT_SECTIONS}
    pool = _pool(_section(data, "pool", path), path)
    return CheckpointConfig(
        **common,
        backbone=None if data.get("backbone") is None else _backbone(data["backbone"], path),
        truncation=_truncation(data.get("truncation"), path),
        pool=pool,
        lambdas=_lambdas(data.get("lambdas"), path, [m.name for m in pool]),
        encoder=_frozen(encoder),
        model=_frozen(_section(data, "model", path)),
        training=_frozen(training),
    )


def read_checkpoint(folder: str | Path) -> CheckpointConfig:
    """:func:`read_config` for a probe checkpoint (:class:`CheckpointError` for other kinds)."""
    config = read_config(folder)
    if config.kind not in PROBE_KINDS:
        raise CheckpointError(
            f"{Path(folder) / CONFIG_FILE}: `kind` must be one of {', '.join(PROBE_KINDS)} for a probe, "
            f"got {config.kind!r}."
        )
    return config


# ---- writing: a temporary sibling folder swapped in ----------------------------------------


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths (Linux ``renameat2(RENAME_EXCHANGE)``); False if
    the platform cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    return False


def _publish(folder: Path, files: Mapping[str, bytes]) -> None:
    """Write ``files`` as the whole content of ``folder``, atomically (see module docstring)."""
    folder = folder.absolute()
    if folder.exists():
        if not folder.is_dir():
            raise CheckpointError(f"Cannot write a checkpoint to {folder}: it is not a folder.")
        if any(folder.iterdir()) and not (folder / CONFIG_FILE).exists():
            raise CheckpointError(
                f"{folder} exists and holds files but no {CONFIG_FILE}; not replacing a folder that is not a checkpoint."
            )
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = folder.parent / f".{folder.name}.{uuid.uuid4().hex[:8]}.tmp"
        tmp.mkdir()
    except OSError as exc:
        raise CheckpointError(f"Cannot write a checkpoint next to {folder}: {exc}.") from exc
    try:
        for name, content in files.items():
            (tmp / name).write_bytes(content)
            _fsync(tmp / name)
        if folder.exists() and _exchange(tmp, folder):
            shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old checkpoint
        elif folder.exists():
            old = folder.parent / f".{folder.name}.{uuid.uuid4().hex[:8]}.old"
            os.replace(folder, old)
            os.replace(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, folder)
        _fsync(folder.parent)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"Cannot write the checkpoint {folder}: {exc}.") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _json_bytes(data: Mapping[str, Any]) -> bytes:
    def default(value: Any) -> Any:
        if isinstance(value, tuple):
            return list(value)
        raise TypeError(f"{type(value).__name__} is not JSON serialisable")

    return (json.dumps(data, indent=2, default=default) + "\n").encode()


def _weights_bytes(state: Mapping[str, Any], kind: str) -> bytes:
    from safetensors.torch import save

    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    return save(tensors, metadata={"kind": kind})


def _write(folder: Path, config: dict[str, Any], weights: bytes, extra: Mapping[str, bytes] | None = None) -> None:
    """Publish the checkpoint; ``extra``: more files written with it (``validation.jsonl``)."""
    config["weights_sha256"] = hashlib.sha256(weights).hexdigest()
    _publish(folder, {**(extra or {}), WEIGHTS_FILE: weights, CONFIG_FILE: _json_bytes(config)})


def _read_weights(config: CheckpointConfig) -> dict[str, Any]:
    """The weights of ``config``'s checkpoint, checked against ``weights_sha256``."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    path = config.folder / WEIGHTS_FILE
    try:
        raw = path.read_bytes()
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path} does not exist.") from exc
    except OSError as exc:
        raise CheckpointError(f"Cannot read {path}: {exc}.") from exc
    if config.weights_sha256 is not None and hashlib.sha256(raw).hexdigest() != config.weights_sha256:
        raise CheckpointError(
            f"Cannot load {path}: its sha256 differs from `weights_sha256` in {CONFIG_FILE} "
            "(the file is corrupt or was replaced separately)."
        )
    try:
        return load(raw)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"Cannot load {path}: {exc}") from exc


# ---- probes -------------------------------------------------------------------------------


def save_probe(
    folder: str | Path,
    probe: Any,
    backbone: Any,
    *,
    training: Mapping[str, Any] | None = None,
    thresholds: Sequence[Mapping[str, Any]] | None = None,
    target: str = "small_ok",
    large: str | None = None,
    validation_rows: bytes | None = None,
) -> CheckpointConfig:
    """Write ``probe`` (trained on ``backbone`` to predict ``target``) to ``folder``,
    replacing any checkpoint there atomically; the backbone's truncation is recorded with
    it, and ``validation_rows`` (labelled JSONL) as :data:`VALIDATION_FILE` when given."""
    config = {
        "format_version": FORMAT_VERSION,
        "kind": probe.kind,
        "target": target,
        "large": large,
        "backbone": backbone.describe(probe.layer),
        "truncation": backbone.truncation.to_dict(),
        "probe": probe.config.to_dict(),
        "training": dict(training or {}),
        "thresholds": [dict(t) for t in thresholds or ()],
    }
    _target(config, Path(folder) / CONFIG_FILE)
    state = {k: v.float() for k, v in probe.saved_state().items()}
    extra = {VALIDATION_FILE: validation_rows} if validation_rows is not None else None
    _write(Path(folder), config, _weights_bytes(state, probe.kind), extra)
    return read_checkpoint(folder)


def check_backbone(checkpoint: CheckpointConfig, backbone: Any) -> None:
    """Raise :class:`CheckpointError` unless ``backbone`` is the one the checkpoint read."""
    wanted = checkpoint.backbone
    if wanted is None:
        return
    kept = len(backbone._layer_list)
    if wanted.layer > kept:
        raise CheckpointError(
            f"Checkpoint {checkpoint.folder} reads layer {wanted.layer}, but backbone "
            f"{backbone.source} keeps only {kept} layers."
        )
    given = backbone.describe(wanted.layer)
    differ = [k for k in _MATCHED if str(given[k]) != str(getattr(wanted, k))]
    if differ:
        detail = "; ".join(f"{k}: trained on {getattr(wanted, k)!r}, given {given[k]!r}" for k in differ)
        raise CheckpointError(
            f"Checkpoint {checkpoint.folder} was trained on backbone {wanted.path}, which does not "
            f"match backbone {given['path']} ({detail})."
        )
    if checkpoint.truncation is not None and backbone.truncation != checkpoint.truncation:
        raise CheckpointError(
            f"Checkpoint {checkpoint.folder} was trained on prompts cut to {checkpoint.truncation.max_tokens} "
            f"tokens, but backbone {backbone.source} cuts them to {backbone.truncation.max_tokens}."
        )


def load_probe(folder: str | Path, backbone: Any) -> tuple[Any, CheckpointConfig]:
    """Load the probe in ``folder`` onto ``backbone`` (checked to match), in eval mode."""
    from routers.probes import build_probe, probe_config_class

    checkpoint = read_checkpoint(folder)
    check_backbone(checkpoint, backbone)
    try:
        config = probe_config_class(checkpoint.kind).from_dict(dict(checkpoint.model))
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{checkpoint.folder / CONFIG_FILE}: bad `probe` section: {exc}") from exc
    probe = build_probe(checkpoint.kind, config, backbone.layer_module(config.layer))
    try:
        probe.load_saved_state(_read_weights(checkpoint))
    except (ValueError, RuntimeError, KeyError) as exc:
        raise CheckpointError(f"Cannot load {checkpoint.folder / WEIGHTS_FILE}: {exc}") from exc
    probe.to(backbone.device)
    return probe.eval(), checkpoint


def load_backbone(checkpoints: Sequence[CheckpointConfig], **runtime: Any) -> Any:
    """The backbone the probe ``checkpoints`` were trained on, kept up to their deepest
    layer, cutting prompts as they were cut in training.

    ``runtime`` holds :class:`routers.backbone.BackboneConfig` runtime fields (device, dtype,
    image limits); ``None`` values are ignored. The truncation comes from the checkpoints.
    """
    from routers.backbone import BackboneConfig, TruncatedBackbone

    if not checkpoints:
        raise CheckpointError("No probe checkpoints given.")
    paths = sorted({c.backbone.path for c in checkpoints if c.backbone is not None})
    if len(paths) != 1:
        raise CheckpointError(f"Probes scored together must share one backbone; got {paths}.")
    cuts = {c.truncation for c in checkpoints}
    if len(cuts) != 1:
        detail = ", ".join(f"{c.folder}: {c.max_tokens}" for c in checkpoints)
        raise CheckpointError(f"Probes scored together must cut prompts alike; max_tokens differ ({detail}).")
    runtime = {k: v for k, v in runtime.items() if v is not None}
    for saved in ("max_tokens", "head_tokens", "path", "layer"):
        if saved in runtime:
            raise CheckpointError(f"`{saved}` comes from the probe checkpoints; it cannot be set at load time.")
    truncation = cuts.pop() or Truncation()
    layer = max(c.layer for c in checkpoints)
    try:
        config = BackboneConfig(
            path=paths[0], layer=layer, max_tokens=truncation.max_tokens, head_tokens=truncation.head, **runtime
        )
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"Bad backbone settings for {paths[0]}: {exc}") from exc
    return TruncatedBackbone(config)


def store_threshold(folder: str | Path, entry: Mapping[str, Any]) -> CheckpointConfig:
    """Add (or replace, for the same ``large_share``) a calibrated threshold in
    ``config.json``, rewritten atomically (the weights are untouched)."""
    read_checkpoint(folder)  # a probe's
    return _store_calibration(folder, "thresholds", entry)


def store_lambda(folder: str | Path, entry: Mapping[str, Any]) -> CheckpointConfig:
    """Add (or replace, for the same ``large_share``) a calibrated LatentRouter λ in
    ``config.json`` (``lambdas``), rewritten atomically (the weights are untouched)."""
    config = read_config(folder)
    if config.kind != LATENT_ROUTER_KIND:
        raise CheckpointError(f"{config.folder / CONFIG_FILE}: λ is calibrated for LatentRouter checkpoints, not {config.kind!r}.")
    return _store_calibration(folder, "lambdas", entry)


def _store_calibration(folder: str | Path, key: str, entry: Mapping[str, Any]) -> CheckpointConfig:
    checkpoint = read_config(folder)
    data = read_raw_config(checkpoint.folder)
    share = float(entry["large_share"])
    kept = [t for t in data.get(key) or [] if abs(float(t["large_share"]) - share) > 1e-9]
    data[key] = [*kept, dict(entry)]
    path = checkpoint.folder / CONFIG_FILE
    tmp = checkpoint.folder / f".{CONFIG_FILE}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        tmp.write_bytes(_json_bytes(data))
        _fsync(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise CheckpointError(f"Cannot write {path}: {exc}.") from exc
    return read_config(folder)


# ---- LatentRouter -------------------------------------------------------------------------


def save_latent_router(
    router: Any, folder: str | Path, *, training: Mapping[str, Any] | None = None, validation_rows: bytes | None = None
) -> Path:
    """Write ``router`` to ``folder``, replacing any checkpoint there atomically; returns
    the folder. ``training`` is merged over what training recorded (``router.extra``);
    ``validation_rows`` (labelled JSONL) is written as :data:`VALIDATION_FILE` when given."""
    encoder = router.encoder
    config: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "kind": LATENT_ROUTER_KIND,
        "encoder": asdict(encoder.spec),
        "model": asdict(router.model.config),
        "pool": asdict(router.pool),
        "training": {**router.extra, **(training or {})},
    }
    if getattr(encoder, "truncation", None) is not None:
        config["truncation"] = encoder.truncation.to_dict()
    if encoder.spec.kind == "backbone" and hasattr(encoder, "backbone"):
        config["backbone"] = encoder.backbone.describe(encoder.spec.layer)
    folder = Path(folder)
    extra = {VALIDATION_FILE: validation_rows} if validation_rows is not None else None
    _write(folder, config, _weights_bytes(router.model.state_dict(), LATENT_ROUTER_KIND), extra)
    return folder


def load_latent_router(
    folder: str | Path, device: Any = None, encoder: Any = None, backbone: Any = None
) -> Any:
    """Load a LatentRouter checkpoint; :class:`CheckpointError` naming the problem if it is bad.

    ``encoder`` (an already-built query encoder) or ``backbone`` (a loaded
    :class:`~routers.backbone.TruncatedBackbone`, for the ``backbone`` encoder) can be passed
    in to share them; either is checked against the checkpoint (fingerprint, truncation).
    """
    import torch

    from routers.latent.encoders import EncoderSpec, build_encoder
    from routers.latent.router import LatentRouter, LatentRouterConfig, LatentRouterModel, ModelPool

    checkpoint = read_config(folder)
    path = checkpoint.folder / CONFIG_FILE
    if checkpoint.kind != LATENT_ROUTER_KIND:
        raise CheckpointError(f"{path} has kind {checkpoint.kind!r}, expected {LATENT_ROUTER_KIND!r}.")
    data = read_raw_config(checkpoint.folder)
    try:
        model_cfg = LatentRouterConfig(**data["model"])
        pool = ModelPool(**data["pool"])
        spec = EncoderSpec(**data["encoder"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path} has a bad or missing section: {exc}") from exc
    if len(pool.names) != model_cfg.num_models or len(pool.profile_fields) != model_cfg.profile_dim:
        raise CheckpointError(f"{path}: the pool does not match `model.num_models` / `model.profile_dim`.")
    dev = torch.device(device) if device is not None else torch.device("cpu")
    model = LatentRouterModel(model_cfg)
    try:
        model.load_state_dict(_read_weights(checkpoint), strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"Cannot load weights from {checkpoint.folder / WEIGHTS_FILE}: {exc}") from exc
    model.to(dev).eval()
    if encoder is None:
        encoder = build_encoder(spec, device=dev, backbone=backbone)
    if encoder.dim != model_cfg.input_dim:
        raise CheckpointError(
            f"The {spec.kind} encoder gives {encoder.dim} features but the checkpoint expects {model_cfg.input_dim}."
        )
    if hasattr(encoder, "backbone"):
        check_backbone(checkpoint, encoder.backbone)
    if checkpoint.truncation is not None and getattr(encoder, "truncation", None) != checkpoint.truncation:
        got = getattr(getattr(encoder, "truncation", None), "max_tokens", None)
        raise CheckpointError(
            f"Checkpoint {checkpoint.folder} was trained on texts cut to {checkpoint.max_tokens} tokens, "
            f"but its {spec.kind} encoder cuts them to {got}."
        )
    return LatentRouter(model, encoder, pool, dict(checkpoint.training))
