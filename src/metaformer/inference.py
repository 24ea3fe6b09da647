"""Run a trained model for inference on the fastest backend and precision this machine has.

The documented public door to ``metaformer.deploy`` (where the backends, quantization and the artefact
cache live, and where these names are defined): ``prepare_for_inference(model, backend="auto",
precision="fp32")`` returns a module to call on image batches and the backend it chose, and
``onnxruntime_options`` the session options our runtimes use. See ``metaformer.deploy`` for how
``auto`` decides.
"""

from __future__ import annotations

from metaformer.deploy import BACKENDS, PRECISIONS, prepare_for_inference
from metaformer.deploy.runtimes import onnxruntime_options

__all__ = ["BACKENDS", "PRECISIONS", "onnxruntime_options", "prepare_for_inference"]
