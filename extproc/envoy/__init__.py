"""Rendering and checking the Envoy configuration that puts switchyard in front of the backends."""
