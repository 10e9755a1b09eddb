"""The defect inspector as an MLflow pyfunc model, logged from code (nothing is pickled).

MLflow loads this file and the run's `inspector/` artifacts (safetensors, config, classes).
`predict` takes {"images": float array (N, 3, H, W) in [0, 1], at the inspector's image size}
and returns the per-class probabilities (N, C), in the order of classes.json; CODEBRIM counts a
class present above 0.5. dgan's own commands read the safetensors directly.
"""

from __future__ import annotations

import mlflow
import numpy as np


class DefectInspector(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from dgan.models.inspector import load_inspector

        self.inspector, self.config, self.classes = load_inspector(context.artifacts["inspector"])

    def predict(self, context, model_input, params=None):
        import torch

        images = torch.as_tensor(np.asarray(model_input["images"]), dtype=torch.float32)
        with torch.no_grad():
            logits, _ = self.inspector(images)
        return torch.sigmoid(logits).numpy()


mlflow.models.set_model(DefectInspector())
