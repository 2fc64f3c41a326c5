"""``switchyard.v1``: the remote scorer API (``scorer.proto``) and its generated code."""
