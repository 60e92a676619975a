"""Accuracy and cost comparisons against the eager model, reports and plots."""
