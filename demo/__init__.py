"""The switchyard demo: a tiny OpenAI-compatible backend, Envoy config rendering, ``make run``."""
