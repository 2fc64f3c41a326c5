"""switchyard's own gRPC APIs: ``.proto`` files and the Python code generated from them.

The generated modules (``proto.switchyard.v1.scorer_pb2`` and ``scorer_pb2_grpc``) are
written by ``make proto`` (:mod:`proto.generate`); never edit them by hand.
"""
