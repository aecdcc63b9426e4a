"""Served outputs checked against eager: the HTTP client, per-engine and cross-engine verify, and `make pipeline`."""
