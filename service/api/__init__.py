"""The HTTP side of the node: REST API, dashboard, health and Prometheus metrics."""
