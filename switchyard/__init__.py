"""``switchyard``: generated from ``proto/switchyard/`` by ``make proto`` (``proto/generate.py``); do not edit."""
