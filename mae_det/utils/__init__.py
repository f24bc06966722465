"""Provenance, distributed helpers, FLOP counting, environment report."""
