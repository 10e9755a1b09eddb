"""Everything MLflow: runs, the model registry, model specs and downloads, and the pyfunc flavours.

tracker.py            the tracking URI, one MLflow run per job (Tracker), run tags
registry.py           registered versions of defect-gan and defect-inspector, aliases, promotion
source.py             model specs (run dir, checkpoint, model dir, models:/ URI) -> weights
pyfunc_generator.py   the models-from-code file MLflow serves a generator with
pyfunc_inspector.py   the same for an inspector
"""

from pathlib import Path

PYFUNC_DIR = Path(__file__).parent  # MLflow loads pyfunc_*.py by path; dgan never imports them
