"""Alert rules: Prometheus rule files, the alert state machine, templates and scheduling."""
