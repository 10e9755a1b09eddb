"""The Defect-GAN generator as an MLflow pyfunc model, logged from code (nothing is pickled).

MLflow loads this file and the run's `generator/` artifacts (safetensors, config, classes).
`predict` takes {"images": float array (N, 3, H, W) in [-1, 1], "labels": (N, C) multi-hot} and
returns the defaced images; all-zero labels restore. dgan's own commands read the safetensors
directly and do not need this wrapper.
"""

from __future__ import annotations

import mlflow
import numpy as np


class DefectGanGenerator(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from dgan.models.export import load_generator

        self.generator, self.config, self.classes = load_generator(context.artifacts["generator"])

    def predict(self, context, model_input, params=None):
        import torch

        from dgan.inference import deface

        images = torch.as_tensor(np.asarray(model_input["images"]), dtype=torch.float32)
        labels = torch.as_tensor(np.asarray(model_input["labels"]), dtype=torch.float32)
        seed = (params or {}).get("seed")
        defects, _ = deface(self.generator, images, labels, seed=seed)
        return defects.numpy()


mlflow.models.set_model(DefectGanGenerator())
