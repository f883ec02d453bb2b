"""What operators see: Prometheus metrics named after the OpenTelemetry GenAI conventions."""
