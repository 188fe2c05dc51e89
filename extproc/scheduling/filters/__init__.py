"""Filters: each keeps a subset of the candidates (one module per filter)."""
