"""Accuracy parity against the eager model: the build's smoke check, the metrics and their gate, reports."""
