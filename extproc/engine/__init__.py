"""Deciding a request with a policy: the pure rule engine and the :class:`Decision` it returns.
No I/O and no grpc: scorers are asked by the layer above (:mod:`extproc.scoring`)."""
