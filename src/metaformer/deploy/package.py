"""A folder you ship: the exported model files and ``metaformer.json``, which says how to run them.

``write_folder`` exports a classifier (``export_deployable``: ONNX, OpenVINO IR or TorchScript; fp32,
bf16 or int8) into a temp folder beside ``folder`` and renames it into place whole, so a reader never
sees a half-written one. ``metaformer.json`` holds what running the files needs without the torch
checkpoint: class names, preprocessing (resize, crop, mean, std), input size, precision, runtime, the
check made at export (fp32: the difference from PyTorch; int8: top-1 agreement with fp32 on the
held-out calibration images, how many, and on which CPU), the calibration source's hash, every file's
sha256 and the versions. ``load_folder`` reads it back (``classify predict`` / ``eval`` with
``--checkpoint FOLDER``) and refuses, in one sentence each, a missing or corrupt ``metaformer.json``,
model files from another export and images of another size.

An int8 folder's agreement was measured on the CPU that exported it: int8 kernels differ between
CPUs (onnxruntime's U8S8 ones saturate on x86-64 without VNNI), so on another kind of CPU measure it
again (export there, or ``classify eval --checkpoint FOLDER``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
import torch

from metaformer.deploy.base import Runner
from metaformer.errors import CheckpointError, ConfigError, InputSizeError, WriteError

MANIFEST = "metaformer.json"
MANIFEST_VERSION = 1
MODEL_FILES = {"onnx": ("model.onnx",), "openvino": ("model.xml", "model.bin"), "torchscript": ("model.pt",)}
RUNTIMES = {"onnx": "onnxruntime", "openvino": "openvino", "torchscript": "torch"}
FILE_SUFFIXES = (".onnx", ".xml", ".bin", ".pt", ".pth", ".ts", ".safetensors")
REQUIRED = ("format", "precision", "files", "class_names", "preprocessing", "input_size")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _versions() -> dict[str, str]:
    from metaformer import __version__

    found = {"metaformer": __version__, "torch": torch.__version__}
    for name in ("onnx", "onnxruntime", "openvino", "nncf"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found


def check_output(folder: Path) -> None:
    """ConfigError when ``folder`` looks like a file name (an export is a folder now) or is something
    else than an exported folder that may be replaced."""
    if folder.suffix.lower() in FILE_SUFFIXES:
        raise ConfigError(
            f"--output '{folder}' names a file, but export now writes a folder (the model files and "
            f"metaformer.json); pass --output {folder.with_suffix('')}"
        )
    if folder.exists() and not (
        folder.is_dir() and (not any(folder.iterdir()) or (folder / MANIFEST).is_file())
    ):
        raise WriteError(
            f"'{folder}' exists and is not an exported folder; pass a new --output folder (export replaces "
            "only a folder it wrote)"
        )


def write_folder(
    model: torch.nn.Module,
    folder: str | os.PathLike,
    *,
    format: str = "onnx",
    precision: str = "fp32",
    img_size: tuple[int, int] = (224, 224),
    class_names: Sequence[str] | None = None,
    preprocessing: dict[str, Any] | None = None,
    calibration: Any = None,
    dynamic_batch: bool = True,
    fold: bool = True,
) -> Any:
    """Export ``model`` into ``folder`` (created or replaced whole) with its ``metaformer.json``;
    returns the ``ExportReport`` (its ``path`` is the folder)."""
    import dataclasses

    from metaformer.deploy.export import export_deployable
    from metaformer.deploy.quantize import as_calibration
    from metaformer.models.hardware import cpu_profile

    folder = Path(folder)
    check_output(folder)
    size = (int(img_size[0]), int(img_size[1]))
    calibration = as_calibration(calibration)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        first = tmp / MODEL_FILES[format][0]
        report = export_deployable(
            model, first, format=format, precision=precision, img_size=size, fold=fold,
            dynamic_batch=dynamic_batch or format == "openvino" or precision != "fp32",
            calibration=calibration,
        )  # fmt: skip
        num_classes = int(getattr(model, "num_classes", 0) or 0)
        names = list(class_names) if class_names else [str(i) for i in range(num_classes)]
        preproc = {k: list(v) if isinstance(v, tuple) else v for k, v in (preprocessing or {}).items()}
        preproc["input_size"] = [int(getattr(model, "in_chans", 3)), *size]
        crop = float(preproc.get("crop_pct") or 1.0)
        preproc.setdefault("resize", int(size[0] / crop))
        check: dict[str, Any] = {"max_abs_diff": report.max_abs_diff, "batches": list(report.checked_batches)}
        if precision == "int8":
            from metaformer.deploy.agreement import warn_below

            measured = {"agreement": report.agreement, "images": report.calibration_images, "unit": "image"}
            warn_below(RUNTIMES[format], precision, measured, None)
            check = {
                "agreement_with_fp32": report.agreement,
                "measured_on": f"{report.calibration_images} held-out calibration images (not calibrated on)",
                "cpu": cpu_profile().describe(),
            }
        manifest = {
            "metaformer_export": MANIFEST_VERSION,
            "model": getattr(model, "model_name", type(model).__name__),
            "format": format,
            "runtime": RUNTIMES[format],
            "precision": precision,
            "input_size": list(size),
            "dynamic_batch": report.dynamic_batch,
            "class_names": names,
            "preprocessing": preproc,
            "check": check,
            "calibration": None
            if calibration is None
            else {"source": calibration.key, "sha256": calibration.digest()},
            "files": {name: _sha256(tmp / name) for name in MODEL_FILES[format]},
            "versions": _versions(),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        _replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dataclasses.replace(report, path=folder)


def _replace(tmp: Path, folder: Path) -> None:
    """``tmp`` becomes ``folder``; an earlier export there is moved aside first and removed after."""
    old = None
    if folder.exists():
        old = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.old."))
        os.replace(folder, old / "was")
    try:
        os.replace(tmp, folder)
    except OSError:
        if old is not None:
            os.replace(old / "was", folder)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def is_export_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder ``write_folder`` wrote (it holds ``metaformer.json``), or one meant as
    such: a folder holding model files but no ``config.json`` (a hub folder's)."""
    path = Path(path)
    if not path.is_dir():
        return False
    if (path / MANIFEST).exists():
        return True
    names = {p.name for p in path.iterdir()}
    return not (names & {"config.json"}) and bool(
        names & {n for files in MODEL_FILES.values() for n in files}
    )


def read_manifest(folder: str | os.PathLike) -> dict[str, Any]:
    """``folder``'s ``metaformer.json``, checked, with every model file it names checked by its sha256."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise CheckpointError(
            f"'{folder}' holds no metaformer.json; pass a folder written by `metaformer export` (or export "
            "it again)"
        )
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        reason = getattr(error, "msg", None) or type(error).__name__
        raise CheckpointError(f"'{path}' is not readable JSON ({reason}); export the folder again") from None
    missing = [key for key in REQUIRED if not isinstance(manifest, dict) or key not in manifest]
    if missing or manifest.get("format") not in MODEL_FILES:
        raise CheckpointError(
            f"'{path}' lacks {', '.join(missing) or 'a known format'}; export the folder again"
        )
    for name, digest in dict(manifest["files"]).items():
        file = folder / name
        if not file.is_file():
            raise CheckpointError(
                f"'{folder}' lacks {name}, which its metaformer.json names; export it again"
            )
        if _sha256(file) != digest:
            raise CheckpointError(
                f"'{file}' is not the file this folder's metaformer.json was written with (from another "
                "export?); export the folder again"
            )
    return manifest


class FolderModel(Runner):
    """The model of an exported folder, run by its runtime: (B, C, H, W) float images at the folder's
    input size in, logits out."""

    exported = True  # prepare_for_inference runs it as it is: its backend and precision are fixed

    def __init__(self, folder: Path, manifest: dict[str, Any], threads: int | None = None):
        super().__init__(manifest["runtime"], manifest["precision"], {"folder": str(folder)})
        self.folder, self.manifest = folder, manifest
        self.model_name = str(manifest.get("model", "exported"))
        self.input_size = tuple(int(v) for v in manifest["input_size"])
        self.class_names = list(manifest["class_names"])
        fmt = manifest["format"]
        if fmt == "onnx":
            from metaformer.deploy.runtimes import onnxruntime_session, require

            require("onnxruntime", "--checkpoint with a checkpoint file")
            self.session = onnxruntime_session(folder / "model.onnx", threads)
            self._run = lambda images: self.session.run(None, {self.session.get_inputs()[0].name: images})[0]
        elif fmt == "openvino":
            from metaformer.deploy.runtimes import openvino_compile, openvino_core, require

            require("openvino", "--checkpoint with a checkpoint file")
            precision = "bf16" if manifest["precision"] == "bf16" else "fp32"
            compiled = openvino_compile(
                openvino_core().read_model(str(folder / "model.xml")), precision, threads
            )
            request = compiled.create_infer_request()

            def run(images: np.ndarray) -> np.ndarray:
                request.infer({0: images})
                return request.get_output_tensor(0).data.copy()

            self._run = run
        else:
            with warnings.catch_warnings():  # torch.jit.load's deprecation note: TorchScript is the format
                warnings.simplefilter("ignore", FutureWarning)
                scripted = torch.jit.load(str(folder / "model.pt"), map_location="cpu").eval()

            def run_scripted(images: np.ndarray) -> np.ndarray:
                with torch.no_grad():
                    return scripted(torch.from_numpy(images)).numpy()

            self._run = run_scripted

    def run(self, images: np.ndarray) -> np.ndarray:
        if tuple(images.shape[-2:]) != self.input_size:
            h, w = self.input_size
            raise InputSizeError(
                f"the model in '{self.folder}' takes {h}x{w} images, not "
                f"{images.shape[-2]}x{images.shape[-1]}; resize them to {h}x{w} (its metaformer.json's size)"
            )
        if self.manifest.get("dynamic_batch", True):
            return self._run(images)
        return np.concatenate([self._run(images[i : i + 1]) for i in range(len(images))])

    def describe(self) -> str:
        return f"{self.backend} {self.precision} (exported folder)"


def load_folder(folder: str | os.PathLike, threads: int | None = None) -> FolderModel:
    """The runnable model of an exported folder, checked (``read_manifest``)."""
    folder = Path(folder)
    return FolderModel(folder, read_manifest(folder), threads)


__all__ = [
    "MANIFEST",
    "FolderModel",
    "check_output",
    "is_export_folder",
    "load_folder",
    "read_manifest",
    "write_folder",
]
