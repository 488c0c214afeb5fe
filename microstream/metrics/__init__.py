"""Metrics: one declaration of every metric, Prometheus and OpenTelemetry exporters."""
