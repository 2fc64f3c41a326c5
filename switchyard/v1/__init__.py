"""``switchyard.v1``: generated from ``proto/switchyard/v1/`` by ``make proto`` (``proto/generate.py``); do not edit."""
