"""Semantic segmentation: Semantic FPN (Panoptic FPN's semantic branch) on a MetaFormer backbone.

The package, one concern per module: ``model`` (the Semantic FPN), ``checkpoint`` (its weights files),
``openmmlab`` (official mmseg checkpoints), ``train`` (task, metrics, recipes, data, ``train_segmenter``),
``evaluate``, ``predict`` (and the drawing), ``deploy`` (backends, precisions and int8 calibration for
eval and predict) and ``reports`` (terminal text). The CLI calls the command functions through this package.
"""

from __future__ import annotations

from metaformer.tasks import TaskCommands

# isort: off
# the order of these three is the order of `metaformer segment`'s actions: train, eval, predict
from metaformer.tasks.segment.train import SegmentTrainConfig, train_segmenter
from metaformer.tasks.segment.evaluate import SegmentEvalConfig, evaluate_segmenter
from metaformer.tasks.segment.predict import SegmentPredictConfig, predict_segmentation

# isort: on
from metaformer.tasks.segment.reports import eval_report, predict_report, train_report

COMMANDS = TaskCommands(
    __name__,
    "segment",
    "train, evaluate and run Semantic FPN segmenters",
    "Semantic segmentation with a MetaFormer backbone and Semantic FPN. `metaformer segment "
    "train` with no options trains poolformer_s12 on the generated shapes data set.",
)

__all__ = [
    "COMMANDS",
    "SegmentEvalConfig",
    "SegmentPredictConfig",
    "SegmentTrainConfig",
    "eval_report",
    "evaluate_segmenter",
    "predict_report",
    "predict_segmentation",
    "train_report",
    "train_segmenter",
]
