"""The ext_proc gRPC server: the servicer that answers Envoy, the answers it builds, policy
reloads, shadow decisions, and request capture."""
