"""Logs, metrics and traces: the instruments switchyard records into, their OpenTelemetry
set-up, and the Prometheus endpoint."""
