"""Image classification: train, evaluate and predict with any registered MetaFormer.

Two recipes, both built from timm parts (``create_transform``, ``Mixup``, ``SoftTargetCrossEntropy``,
``create_optimizer_v2``, ``create_scheduler_v2``, ``ModelEmaV3``) and run by ``engine.loop.fit``:

- ``paper``: the PoolFormer ImageNet recipe (PAPER.md section 4), the default with ``data=DIR``.
- ``small``: a short recipe for small data sets, the default for the embedded digits (``data=None``).

Every field of ``TrainConfig`` left as None is filled from the recipe by ``TrainConfig.resolve``; the
resolved config is what ``config.json`` records.

The package, one concern per module: ``recipes`` (the presets), ``config`` (``TrainConfig``), ``train``
(task, data, ``train_classifier``), ``loading`` (``load_classifier``), ``evaluate``, ``prediction``,
``cam`` (Grad-CAM) and ``reports`` (terminal text). Every public name is importable from here, and the
CLI calls the functions through this package (so replacing ``metaformer.tasks.classify.<name>``, e.g.
in a test, replaces what ``metaformer classify ...`` runs).
"""

from __future__ import annotations

from metaformer.tasks import TaskCommands

# isort: off
# the order of these three is the order of `metaformer classify`'s actions: train, eval, predict
from metaformer.tasks.classify.train import (
    TRAINING,
    ClassificationTask,
    build_datasets,
    train_classifier,
)
from metaformer.tasks.classify.evaluate import EvalConfig, evaluate_classifier, plot_confusion
from metaformer.tasks.classify.prediction import PredictConfig, predict

# isort: on
from metaformer.tasks.classify.cam import grad_cam, write_cam_png
from metaformer.tasks.classify.config import TrainConfig
from metaformer.tasks.classify.loading import load_classifier
from metaformer.tasks.classify.recipes import (
    EMBEDDED_IMG_SIZE,
    FOLDER_IMG_SIZE,
    INTERPOLATIONS,
    RECIPE_FIELDS,
    RECIPES,
    RESUME_MAY_DIFFER,
)
from metaformer.tasks.classify.reports import eval_report, predict_report, train_report

COMMANDS = TaskCommands(
    __name__,
    "classify",
    "train, evaluate and run image classifiers",
    "Image classification. `metaformer classify train` with no options trains poolformer_s12 on "
    "the embedded digits data set.",
)

__all__ = [
    "COMMANDS",
    "EMBEDDED_IMG_SIZE",
    "FOLDER_IMG_SIZE",
    "INTERPOLATIONS",
    "RECIPES",
    "RECIPE_FIELDS",
    "RESUME_MAY_DIFFER",
    "TRAINING",
    "ClassificationTask",
    "EvalConfig",
    "PredictConfig",
    "TrainConfig",
    "build_datasets",
    "eval_report",
    "evaluate_classifier",
    "grad_cam",
    "load_classifier",
    "plot_confusion",
    "predict",
    "predict_report",
    "train_classifier",
    "train_report",
    "write_cam_png",
]
