"""``switchyard label``: turn prompts into the labelled routing set ``switchyard train`` reads.

One module per job: :mod:`~routers.labelling.config` (the YAML config, checked with
``file:line:column`` errors), :mod:`~routers.labelling.inputs` (the prompt JSONL, streamed),
:mod:`~routers.labelling.client` (OpenAI-compatible calls: bounded, timed, retried),
:mod:`~routers.labelling.graders` (reference graders and the judge's prompt and verdicts),
:mod:`~routers.labelling.writer` (the resumable, fsynced output),
:mod:`~routers.labelling.progress` (the progress bar) and
:mod:`~routers.labelling.labeller` (the run); :mod:`~routers.labelling.cli` is the command.
Nothing here imports torch.
"""

from __future__ import annotations

from routers.labelling.client import FAILURE_KINDS, CallFailed, ChatClient, Completion
from routers.labelling.config import Endpoint, LabelConfig, load_label_config
from routers.labelling.errors import LabelError
from routers.labelling.graders import GRADERS, extract_choice, extract_number
from routers.labelling.inputs import Prompt, default_id
from routers.labelling.labeller import Estimate, LabelOptions, LabelSummary, estimate_file, label_file
from routers.labelling.writer import LabelledWriter

__all__ = [
    "FAILURE_KINDS",
    "GRADERS",
    "CallFailed",
    "ChatClient",
    "Completion",
    "Endpoint",
    "Estimate",
    "LabelConfig",
    "LabelError",
    "LabelOptions",
    "LabelSummary",
    "LabelledWriter",
    "Prompt",
    "default_id",
    "estimate_file",
    "extract_choice",
    "extract_number",
    "label_file",
    "load_label_config",
]
