"""Reading a checkpoint folder's ``config.json``: one place for its errors.

Probe and LatentRouter checkpoints (and ``switchyard eval``'s dispatch on ``kind``) all
start here. Nothing here imports torch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from extproc._errors import CheckpointError

__all__ = ["CONFIG_FILE", "read_checkpoint_config"]

CONFIG_FILE = "config.json"


def read_checkpoint_config(folder: str | Path) -> dict[str, Any]:
    """The JSON object in ``folder/config.json``; :class:`CheckpointError` naming the problem."""
    folder = Path(folder)
    path = folder / CONFIG_FILE
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise CheckpointError(f"No checkpoint at {folder}: {path} does not exist.") from exc
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}.") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"Cannot read {path}: {exc}.") from exc
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(config).__name__}.")
    return config
