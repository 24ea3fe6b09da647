"""Object detection and instance segmentation: torchvision RetinaNet / Mask R-CNN on a MetaFormer backbone.

The package, one concern per module: ``model`` (the detectors and their weights files), ``coco_eval``
(COCO metrics), ``train`` (task, recipes, data, ``train_detector``), ``evaluate``, ``predict`` (and the
drawing) and ``reports`` (terminal text). The CLI calls the command functions through this package.
"""

from __future__ import annotations

from metaformer.tasks import TaskCommands

# isort: off
# the order of these three is the order of `metaformer detect`'s actions: train, eval, predict
from metaformer.tasks.detect.train import DetectTrainConfig, train_detector
from metaformer.tasks.detect.evaluate import DetectEvalConfig, evaluate_detector
from metaformer.tasks.detect.predict import DetectPredictConfig, predict_detections

# isort: on
from metaformer.tasks.detect.reports import eval_report, predict_report, train_report

COMMANDS = TaskCommands(
    __name__,
    "detect",
    "train, evaluate and run RetinaNet / Mask R-CNN detectors",
    "Object detection with a MetaFormer backbone. `metaformer detect train` with no options "
    "trains a poolformer_s12 RetinaNet on the generated shapes data set.",
)

__all__ = [
    "COMMANDS",
    "DetectEvalConfig",
    "DetectPredictConfig",
    "DetectTrainConfig",
    "eval_report",
    "evaluate_detector",
    "predict_detections",
    "predict_report",
    "train_detector",
    "train_report",
]
