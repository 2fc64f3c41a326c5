"""Asking learned scorers at request time: loading them (in process or the gRPC client of a
scorer server), keeping them across reloads, each call within its deadline, and the circuit
breaker that stops calling a failing scorer."""
