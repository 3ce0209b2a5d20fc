"""
The operator's view of a running server: an admin endpoint of its own (off
by default) with a JSON API, Prometheus metrics and a dashboard page.
"""
