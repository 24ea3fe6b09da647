"""Every file a command reads (checkpoint, image, annotation JSON, mask, class list, run config and state),
replaced by an empty file, a truncated one, a folder, and a file of another kind (an image where a
checkpoint goes and a checkpoint where an image goes): one sentence, exit 1 or 2, no traceback.

Runs the real commands on tiny models and a 6-image data set, so a bad file the up-front checks miss is
still caught where it is read, including inside DataLoader workers (the segmentation data cases use two).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from metaformer.cli import main

TINY = '{"depths": [1, 1, 1, 1], "dims": [8, 16, 32, 64]}'
KINDS = ("empty", "truncated", "folder", "other")
SEGMENT = ["--model-kwargs", TINY, "--batch-size", "2", "--crop-size", "64", "--scale", "64", "64"]
SEGMENT += [
    "--fpn-channels",
    "8",
    "--head-channels",
    "8",
    "--recipe",
    "shapes",
    "--epochs",
    "1",
    "--amp",
    "off",
]
DETECT = ["--model-kwargs", TINY, "--batch-size", "2", "--min-size", "64", "--max-size", "64"]
DETECT += ["--fpn-channels", "8", "--recipe", "shapes", "--epochs", "1", "--train-split", "train"]
DETECT += ["--val-split", "val", "--workers", "0"]
CLASSIFY = ["--model-kwargs", TINY, "--epochs", "1", "--limit-train", "32", "--limit-val", "16"]
CLASSIFY += ["--batch-size", "16", "--workers", "0"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny shapes set and one good checkpoint of each kind (built directly, not trained)."""
    from metaformer.data.coco import CocoDetection, coco_split
    from metaformer.data.segmentation import SegAugment, read_class_list
    from metaformer.data.shapes import ShapesConfig, make_shapes
    from metaformer.models import create_model
    from metaformer.tasks.detect.model import DetectorConfig, create_detector, save_detector
    from metaformer.tasks.segment.checkpoint import save_segmenter
    from metaformer.tasks.segment.model import SegmenterConfig, create_segmenter
    from metaformer.weights import save_weights

    root = tmp_path_factory.mktemp("walk")
    data = make_shapes(root, ShapesConfig(num_train=4, num_val=2, img_size=64, seed=5))
    tiny = {"depths": (1, 1, 1, 1), "dims": (8, 16, 32, 64)}
    classifier = create_model("poolformer_s12", num_classes=10, **tiny)
    save_weights(classifier, root / "classify.safetensors", class_names=[str(i) for i in range(10)])
    names = read_class_list(data / "classes.txt")
    seg = create_segmenter(
        SegmenterConfig(len(names), backbone_overrides=tiny, fpn_channels=8, head_channels=8)
    )
    save_segmenter(seg, root / "segment.safetensors", class_names=names, augment=SegAugment(scale=(64, 64)))
    coco = CocoDetection(*coco_split(data, "val"), masks=False)
    det_config = DetectorConfig(len(coco.class_names), backbone_overrides=tiny, fpn_channels=8, min_size=64)
    save_detector(
        create_detector(det_config),
        root / "detect.safetensors",
        class_names=coco.class_names,
        cat_ids=coco.cat_ids,
    )
    run = root / "run"
    assert main(["classify", "train", "--output", str(run), *CLASSIFY, "--stop-after-epoch", "1"]) == 0
    return {"root": root, "data": data, "image": data / "images" / "val" / "000000.png", "run": run}


def _spoil(path: Path, kind: str, other: Path) -> None:
    """Put a bad ``kind`` of file at ``path`` (which may hold a good one, whose bytes 'truncated' halves)."""
    good = path.read_bytes() if path.is_file() else other.read_bytes()
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
    if kind == "folder":
        path.mkdir(parents=True)
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        path.write_bytes(good[: len(good) // 2])
    else:
        path.write_bytes(other.read_bytes())


def _expect_one_sentence(capsys, argv: list[str], bad: Path) -> None:
    code = main(argv)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("metaformer")]
    assert code in (1, 2), f"{' '.join(argv)} exited {code} with a bad {bad.name}"
    assert "Traceback" not in err and "Caught" not in err, err
    assert len(errors) == 1 and err.rstrip().endswith(errors[0]), f"{' '.join(argv)}:\n{err}"
    assert bad.name in errors[0] or bad.parent.name in errors[0], f"'{errors[0]}' does not name {bad}"


# (name, kind of file, command builder: (files, bad path, tmp) -> argv)
CHECKPOINT_SLOTS = {
    "classify eval": lambda f, bad, tmp: ["classify", "eval", "--checkpoint", str(bad), "--limit", "4"],
    "classify predict": lambda f, bad, tmp: [
        "classify",
        "predict",
        str(f["image"]),
        "--checkpoint",
        str(bad),
    ],
    "classify train --init-checkpoint": lambda f, bad, tmp: [
        "classify",
        "train",
        "--output",
        str(tmp / "out"),
        *CLASSIFY,
        "--init-checkpoint",
        str(bad),
    ],
    "detect train --backbone-checkpoint": lambda f, bad, tmp: [
        "detect",
        "train",
        "--data",
        str(f["data"]),
        "--output",
        str(tmp / "out"),
        *DETECT,
        "--backbone-checkpoint",
        str(bad),
    ],
    "segment train --backbone-checkpoint": lambda f, bad, tmp: [
        "segment",
        "train",
        "--data",
        str(f["data"]),
        "--output",
        str(tmp / "out"),
        *SEGMENT,
        "--workers",
        "0",
        "--backbone-checkpoint",
        str(bad),
    ],
    # classify's name for it, which detect and segment also take
    "detect train --init-checkpoint": lambda f, bad, tmp: [
        "detect",
        "train",
        "--data",
        str(f["data"]),
        "--output",
        str(tmp / "out"),
        *DETECT,
        "--init-checkpoint",
        str(bad),
    ],
    "segment train --init-checkpoint": lambda f, bad, tmp: [
        "segment",
        "train",
        "--data",
        str(f["data"]),
        "--output",
        str(tmp / "out"),
        *SEGMENT,
        "--workers",
        "0",
        "--init-checkpoint",
        str(bad),
    ],
    "detect eval": lambda f, bad, tmp: [
        "detect",
        "eval",
        "--checkpoint",
        str(bad),
        "--data",
        str(f["data"]),
        "--split",
        "val",
    ],
    "detect predict": lambda f, bad, tmp: [
        "detect",
        "predict",
        str(f["image"]),
        "--checkpoint",
        str(bad),
        "--output",
        str(tmp / "p"),
    ],
    "segment eval": lambda f, bad, tmp: [
        "segment",
        "eval",
        "--checkpoint",
        str(bad),
        "--data",
        str(f["data"]),
    ],
    "segment predict": lambda f, bad, tmp: [
        "segment",
        "predict",
        str(f["image"]),
        "--checkpoint",
        str(bad),
        "--output",
        str(tmp / "p"),
    ],
    "convert": lambda f, bad, tmp: ["convert", str(bad), str(tmp / "out.safetensors")],
    "export": lambda f, bad, tmp: [
        "export",
        "poolformer_s12",
        "--checkpoint",
        str(bad),
        "-o",
        str(tmp / "m.onnx"),
    ],
}
IMAGE_SLOTS = {
    "classify predict": ("classify.safetensors", ["classify", "predict"]),
    "detect predict": ("detect.safetensors", ["detect", "predict"]),
    "segment predict": ("segment.safetensors", ["segment", "predict"]),
}
# files inside a data set: (command, path under the data folder, good file of another kind)
DATA_SLOTS = {
    "segment train mask": ("segment train", "masks/train/000001.png", "segment.safetensors"),
    "segment train image": ("segment train", "images/train/000001.png", "segment.safetensors"),
    "segment train classes": ("segment train", "classes.txt", "image"),
    "segment eval image": ("segment eval", "images/val/000001.png", "segment.safetensors"),
    "detect train annotations": ("detect train", "annotations/instances_train.json", "image"),
    "detect train image": ("detect train", "images/train/000001.png", "detect.safetensors"),
    "detect eval annotations": ("detect eval", "annotations/instances_val.json", "image"),
}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("slot", list(CHECKPOINT_SLOTS))
def test_bad_checkpoint(files, tmp_path, capsys, slot, kind):
    name = "x.safetensors" if slot != "convert" and slot != "classify train --init-checkpoint" else "x.pth"
    bad = tmp_path / name
    shutil.copy(files["root"] / ("segment.safetensors" if "segment" in slot else "classify.safetensors"), bad)
    _spoil(bad, kind, files["image"])
    _expect_one_sentence(capsys, CHECKPOINT_SLOTS[slot](files, bad, tmp_path), bad)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("slot", list(IMAGE_SLOTS))
def test_bad_image_to_predict(files, tmp_path, capsys, slot, kind):
    checkpoint, command = IMAGE_SLOTS[slot]
    bad = tmp_path / "photo.png"
    shutil.copy(files["image"], bad)
    _spoil(bad, kind, files["root"] / checkpoint)
    argv = [
        *command,
        str(bad),
        "--checkpoint",
        str(files["root"] / checkpoint),
        "--output",
        str(tmp_path / "p"),
    ]
    if slot == "classify predict":
        argv = argv[:-2]
    _expect_one_sentence(capsys, argv, bad)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("slot", list(DATA_SLOTS))
def test_bad_file_in_the_data_set(files, tmp_path, capsys, slot, kind):
    command, inside, other = DATA_SLOTS[slot]
    data = tmp_path / "data"
    shutil.copytree(files["data"], data)
    bad = data / inside
    _spoil(bad, kind, files["image"] if other == "image" else files["root"] / other)
    out = ["--output", str(tmp_path / "out")]
    argv = {
        "segment train": ["segment", "train", "--data", str(data), *out, *SEGMENT, "--workers", "2"],
        "segment eval": [
            "segment",
            "eval",
            "--data",
            str(data),
            "--checkpoint",
            str(files["root"] / "segment.safetensors"),
            "--workers",
            "2",
        ],
        "detect train": ["detect", "train", "--data", str(data), *out, *DETECT],
        "detect eval": [
            "detect",
            "eval",
            "--data",
            str(data),
            "--split",
            "val",
            "--checkpoint",
            str(files["root"] / "detect.safetensors"),
        ],
    }[command]
    _expect_one_sentence(capsys, argv, bad)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", ["config.json", "last.pt"])
def test_bad_run_file_on_resume(files, capsys, name, kind):
    """Spoilt in place (a copied run would record another --output) and put back afterwards."""
    path = files["run"] / name
    good = path.read_bytes()
    try:
        _spoil(path, kind, files["image"])
        argv = ["classify", "train", "--output", str(files["run"]), *CLASSIFY, "--resume"]
        _expect_one_sentence(capsys, argv, path)
    finally:
        if path.is_dir():
            path.rmdir()
        path.write_bytes(good)


FASHION_FILES = ("train-images-idx3", "train-labels-idx1", "t10k-images-idx3", "t10k-labels-idx1")


def _fashion_mnist(root: Path) -> Path:
    """The four Fashion-MNIST IDX files, gzipped, with a few random images (the format only)."""
    import gzip

    import numpy as np

    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    for prefix, n in (("train", 30), ("t10k", 20)):
        for kind, array in (
            ("images-idx3", rng.integers(0, 256, (n, 28, 28))),
            ("labels-idx1", np.arange(n) % 10),
        ):
            data = np.ascontiguousarray(array, dtype=np.uint8)
            header = bytes([0, 0, 8, data.ndim]) + b"".join(k.to_bytes(4, "big") for k in data.shape)
            (root / f"{prefix}-{kind}-ubyte.gz").write_bytes(gzip.compress(header + data.tobytes()))
    return root


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("command", ["train", "eval"])
@pytest.mark.parametrize("name", FASHION_FILES)
def test_bad_fashion_mnist_file(files, tmp_path, capsys, name, command, kind):
    data = _fashion_mnist(tmp_path / "fm")
    bad = data / f"{name}-ubyte.gz"
    _spoil(bad, kind, files["image"])
    source = ["--data", f"fashion-mnist:{data}"]
    if command == "train":
        argv = ["classify", "train", *source, "--output", str(tmp_path / "out"), *CLASSIFY]
    else:
        argv = ["classify", "eval", *source, "--checkpoint", str(files["root"] / "classify.safetensors")]
    _expect_one_sentence(capsys, argv, bad)
