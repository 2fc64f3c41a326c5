"""A synthetic routing set with planted structure, for tests and the quality bench.

Four query categories, each with its own vocabulary; four models, each good at a known
category, with different costs:

    model        cost   chat  math  code  law
    tiny         0.05   0.90  0.20  0.20  0.20
    math-7b      0.25   0.60  0.90  0.30  0.30
    code-7b      0.25   0.60  0.30  0.90  0.30
    large        1.00   0.90  0.85  0.85  0.85

So the best route depends on the category and on λ: the oracle uses the specialist (or
tiny for chat) and ``large`` only for law. Rows follow the labelled JSONL format (docs/learned-scorers.md, "Data").
No torch here.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["SYNTHETIC_MODELS", "SYNTHETIC_CATEGORIES", "synthetic_rows", "write_synthetic"]

SYNTHETIC_CATEGORIES: tuple[str, ...] = ("chat", "math", "code", "law")

#: model -> (cost, {category: expected quality})
SYNTHETIC_MODELS: dict[str, tuple[float, dict[str, float]]] = {
    "tiny": (0.05, {"chat": 0.9, "math": 0.2, "code": 0.2, "law": 0.2}),
    "math-7b": (0.25, {"chat": 0.6, "math": 0.9, "code": 0.3, "law": 0.3}),
    "code-7b": (0.25, {"chat": 0.6, "math": 0.3, "code": 0.9, "law": 0.3}),
    "large": (1.0, {"chat": 0.9, "math": 0.85, "code": 0.85, "law": 0.85}),
}

_VOCAB: dict[str, tuple[str, ...]] = {
    "chat": ("hello", "thanks", "weekend", "movie", "friend", "weather", "coffee", "favourite", "chat", "fun"),
    "math": ("integral", "solve", "equation", "prime", "derivative", "sum", "matrix", "probability", "algebra", "proof"),
    "code": ("python", "function", "bug", "compile", "regex", "class", "stack", "trace", "rust", "async"),
    "law": ("contract", "liability", "statute", "court", "tenant", "clause", "appeal", "patent", "jurisdiction", "tort"),
}
_FILLER = ("please", "could", "you", "the", "a", "about", "my", "this", "how", "what", "why", "explain", "help", "me")


def synthetic_rows(
    n: int,
    seed: int = 0,
    outcome: str = "score",
    noise: float = 0.05,
    models: Mapping[str, tuple[float, Mapping[str, float]]] | None = None,
) -> list[dict[str, Any]]:
    """``n`` labelled rows, categories in turn; ``outcome`` is ``score`` (expected quality +
    Gaussian ``noise``, clipped to [0, 1]) or ``correct`` (Bernoulli). Each row carries its
    ``category`` (extra field, ignored by loaders)."""
    if outcome not in ("score", "correct"):
        raise ValueError(f"`outcome` should be 'score' or 'correct', got {outcome!r}.")
    if n < 1:
        raise ValueError(f"`n` should be >= 1, got {n!r}.")
    models = SYNTHETIC_MODELS if models is None else models
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        category = SYNTHETIC_CATEGORIES[i % len(SYNTHETIC_CATEGORIES)]
        words = rng.choices(_VOCAB[category], k=rng.randint(3, 6)) + rng.choices(_FILLER, k=rng.randint(2, 8))
        rng.shuffle(words)
        outcomes = {}
        for name, (cost, skill) in models.items():
            p = skill[category]
            if outcome == "score":
                value: dict[str, Any] = {"score": round(min(1.0, max(0.0, rng.gauss(p, noise))), 4)}
            else:
                value = {"correct": int(rng.random() < p)}
            value["cost"] = round(cost * rng.uniform(0.9, 1.1), 5)
            outcomes[name] = value
        rows.append({
            "id": f"syn-{seed}-{i}",
            "category": category,
            "messages": [{"role": "user", "content": " ".join(words) + "?"}],
            "outcomes": outcomes,
        })
    return rows


def write_synthetic(path: str | Path, rows: Sequence[Mapping[str, Any]]) -> Path:
    """Write ``rows`` as JSONL; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path
