"""What DSA costs: the closed-form model (model.py), the exported graph's own cost (graph.py), decode steps measured
on this machine (measure.py), and the report with its plots (report.py)."""
