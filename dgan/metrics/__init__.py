"""Metrics, one module per kind.

- `classification`: the defect inspector's CODEBRIM metrics (multi-target accuracy, per-class
  precision, recall, F1 and AP, macro averages), on torchmetrics.
- `fid`: Fréchet distance and KID between feature sets, and cached reference statistics.
- `features`: the frozen extractors they run on (standard Inception, or an inspector), by name.
- `synthesis`: synthesis quality beyond FID (category control, background preservation,
  spatial-control precision, diversity).
"""
