"""Where a detect or segment run's images come from: the ``--data`` folder, or the generated shapes set."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from metaformer.data.shapes import ShapesConfig, make_shapes
from metaformer.engine.distributed import DistInfo, barrier, run_on_main


def data_root(data: str | Path | None, shapes: ShapesConfig) -> str | Path:
    """``data`` as given, or the folder of the shapes set ``shapes`` describes (generated on first use)."""
    return data if data is not None else make_shapes(config=shapes)


def shapes_first(shapes: ShapesConfig) -> Callable[[Any, DistInfo], None]:
    """A training run's ``prepare`` step: without ``--data``, generate the shapes set once, on rank 0,
    before any process reads it."""

    def prepare(config: Any, info: DistInfo) -> None:
        if config.data is None:
            run_on_main(lambda: make_shapes(config=shapes), info)
            barrier()

    return prepare
