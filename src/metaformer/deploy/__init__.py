"""Deployment: run a trained model on the fastest backend and precision this machine has.

The layer below the tasks (classify eval and predict call ``prepare_for_inference``, the export
command ``package.write_folder``); it imports no task. Its modules, one concern each:

- ``backends``: the backends by name, ``Backend`` objects with the one interface ``base`` describes
  (``backend_torch``: our fast path, fp32/bf16; ``backend_onnxruntime``: fp32 and QDQ int8;
  ``backend_openvino``: fp32/bf16 and NNCF int8), and which of them can run a precision here;
- ``building``: a backend's runner built (exported, quantized, checked) or loaded from ``cache``;
- ``choice``: ``prepare_for_inference``, the backend named or ``auto``'s measured choice (weighing a
  backend's one-off cost against the work announced), with int8's trust rule (``agreement``);
- ``export`` and ``package``: the model file a user ships, and the folder around it;
- beside them ``onnx_export`` (the folded, checked ONNX graph every runtime starts from),
  ``quantize`` (calibration and the quantizers), ``runtimes`` (how sessions are opened).

Models: a classifier, or any model holding a MetaFormer backbone whose outputs are logits, such as the
Semantic FPN segmenter (``dynamic_size=True``: its exported graph takes every image height and width).
"""

from metaformer.deploy.backends import BACKENDS, PRECISIONS, backend, candidates
from metaformer.deploy.building import build, cached_entry
from metaformer.deploy.choice import prepare_for_inference
from metaformer.deploy.export import EXPORT_PRECISIONS, FAST_RUNTIME, export_deployable

__all__ = [
    "BACKENDS",
    "EXPORT_PRECISIONS",
    "FAST_RUNTIME",
    "PRECISIONS",
    "backend",
    "build",
    "cached_entry",
    "candidates",
    "export_deployable",
    "prepare_for_inference",
]
