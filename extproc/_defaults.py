"""Defaults and names that several parts of switchyard state, each declared once here.

Stdlib only and import-free, so the CLI, the Envoy renderer and ``routers`` (through the
package's public names) read them without loading anything else.
"""

from __future__ import annotations

__all__ = ["DEFAULT_EXTPROC_ADDRESS", "DEFAULT_GRACE_S", "LEARNED_COMMANDS", "ML_INSTALL_HINT"]

#: Where switchyard serves ext_proc unless told otherwise (``serve --listen``) and where the
#: rendered Envoy config looks for it (``envoy render --extproc``).
DEFAULT_EXTPROC_ADDRESS = "127.0.0.1:50051"

#: On shutdown, once the drain is over, the seconds that open streams (``serve --grace``) or
#: in-flight scorer calls (``scorer serve --grace``) get to finish.
DEFAULT_GRACE_S = 5.0

#: The ``switchyard`` commands ``routers.cli`` adds: the learned scorers and labelling.
LEARNED_COMMANDS = ("train", "eval", "calibrate", "scorer", "label")

#: How to get what the learned scorers need, for the errors that find it missing.
ML_INSTALL_HINT = "install the learned-scorer extra: pip install torch==2.13.0 'switchyard[ml]'"
