"""Metrics, one module per kind.

- `classification`: the defect inspector's CODEBRIM metrics (multi-target accuracy, per-class
  precision, recall, F1 and AP, macro averages), on torchmetrics.
"""
