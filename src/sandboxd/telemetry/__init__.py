"""Telemetry: what the server exports about itself (Prometheus metrics: prometheus.py)."""
