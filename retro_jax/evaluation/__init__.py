"""Evaluation: bits-per-byte on held-out documents, the demo, scaling sweeps, fact recall."""
