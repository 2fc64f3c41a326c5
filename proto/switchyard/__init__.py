"""The ``switchyard`` protobuf package (generated code lives in its version folders)."""
