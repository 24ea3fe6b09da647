"""What fine-tuning buys: a model trained on five Fashion-MNIST classes, fine-tuned on a few dozen images a
class of the other five, against the same model trained from scratch on those images with the same budget.

    python benchmarks/finetune.py                      # the documented run
    python benchmarks/finetune.py --quick              # a smoke run on a tiny model
    python benchmarks/finetune.py --data fashion-mnist:DIR

Everything goes through the library as a user would run it: the images are written out as image folders
(``DIR/train/<class>/*.png``, ``DIR/val/<class>/*.png``), the start is ``classify train --recipe small``
on the start classes, and each arm is ``classify train --recipe finetune`` on the few-shot folder, with
``--init-checkpoint`` (fine-tuned) or without it (scratch, layer decay 1). Both arms sweep the same
``lr_base`` values; each (arm, lr) runs every seed, and a seed draws its own few-shot sample (both arms
see the same one). Accuracy is the last epoch's top-1 on all 1,000 test images of each target class
(never a best-of-epochs pick on the test set). The start's own training time is reported apart; a later call
with the same start options reuses the finished start.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from metaformer.data import fashion_mnist as fm  # noqa: E402
from metaformer.system import machine_line  # noqa: E402
from metaformer.tasks.classify import RECIPES, TrainConfig, train_classifier  # noqa: E402

# The start sees a top, trousers, a pullover, a shoe and a bag; the target asks for other tops and shoes
# (dress, coat, shirt; sandal, ankle boot) and nothing it saw. With --start-classes 0 1 2 3 4 the start
# never sees a shoe or a bag, which the target is mostly made of.
START_CLASSES = (0, 1, 2, 7, 8)  # T-shirt/top, Trouser, Pullover, Sneaker, Bag


def folder_name(label: int) -> str:
    return fm.CLASSES[label].replace("/", "-")  # "T-shirt/top" cannot name a folder


def write_folder(root: Path, images: np.ndarray, labels: np.ndarray) -> None:
    for label in np.unique(labels):
        folder = root / folder_name(int(label))
        folder.mkdir(parents=True, exist_ok=True)
        for i in np.flatnonzero(labels == label):
            Image.fromarray(images[i], mode="L").save(folder / f"{i:05d}.png")


def pick(labels: np.ndarray, classes: tuple[int, ...], per_class: int | None, seed: int) -> np.ndarray:
    """Indices of ``per_class`` seeded random images of each class (all of them when None)."""
    rng = np.random.RandomState(seed)
    chosen = []
    for label in classes:
        members = np.flatnonzero(labels == label)
        chosen.append(members if per_class is None else rng.choice(members, per_class, replace=False))
    return np.sort(np.concatenate(chosen))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="fashion-mnist", help="fashion-mnist or fashion-mnist:DIR")
    parser.add_argument("--output", default="finetune-demo", help="folder for the data and runs")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--shots", type=int, default=40, help="training images per target class")
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 4e-3, 1.6e-2], help="lr_base sweep")
    parser.add_argument("--start-images", type=int, default=6000, help="per start class (all 6,000)")
    parser.add_argument("--start-epochs", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=None, help="fine-tuning epochs (the recipe's)")
    parser.add_argument("--test-images", type=int, default=1000, help="per target class (all 1,000)")
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--dims", type=int, nargs=4, default=[32, 64, 128, 256])
    parser.add_argument(
        "--start-classes",
        type=int,
        nargs=5,
        default=list(START_CLASSES),
        metavar="C",
        help="the five Fashion-MNIST labels (0-9) the start trains on; the target is the rest",
    )
    parser.add_argument("--quick", action="store_true", help="tiny model and data: a smoke run")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.shots, args.lrs, args.epochs, args.dims = 2, 2, [1e-3], 2, [8, 8, 16, 16]
        args.start_images, args.start_epochs = 2, 1
    if len(set(args.start_classes)) != 5 or not set(args.start_classes) <= set(range(10)):
        parser.error(f"--start-classes needs five different labels in 0-9, got {args.start_classes}")
    return args


def main() -> None:
    args = parse_args()
    start_classes = tuple(sorted(args.start_classes))
    target_classes = tuple(c for c in range(10) if c not in start_classes)
    batch = {"batch_size": 4} if args.quick else {}
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)

    print(machine_line())
    out = Path(args.output) / ("split-" + "".join(map(str, start_classes)))  # data and runs of this split
    root = fm.fashion_mnist_dir(args.data)
    train_images, train_labels = fm.load_split(root, "train")
    test_images, test_labels = fm.load_split(root, "test")
    model_kwargs = {"dims": list(args.dims)}
    common = dict(model="poolformer_s12", model_kwargs=model_kwargs, img_size=args.img_size, amp="off")
    common.update(progress=False, overwrite=True, verify_images=False, **batch)

    # the start: the small recipe on the five start classes
    start_data = out / "data" / "start"
    if not start_data.is_dir():
        idx = pick(train_labels, start_classes, min(args.start_images, 6000), 0)
        write_folder(start_data / "train", train_images[idx], train_labels[idx])
        idx = pick(test_labels, start_classes, 200 if not args.quick else 2, 0)
        write_folder(start_data / "val", test_images[idx], test_labels[idx])
    summary_file, config_file = out / "start" / "summary.json", out / "start" / "config.json"
    start = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    before = json.loads(config_file.read_text()) if config_file.is_file() else {}
    same = [before.get("model_kwargs"), before.get("img_size")] == [model_kwargs, args.img_size]
    same = same and sorted(before.get("class_names") or []) == sorted(folder_name(c) for c in start_classes)
    if (
        not same
        or start.get("epochs") != args.start_epochs
        or start.get("epochs_planned") != args.start_epochs
    ):
        start = train_classifier(
            TrainConfig(data=str(start_data), recipe="small", epochs=args.start_epochs,
                        output=str(out / "start"), **common)
        )  # fmt: skip
    else:
        print("(the start model of an earlier call with the same options is reused)")
    start_seconds = start["train_seconds"]
    weights = out / "start" / "last.safetensors"

    # the target: every test image of the other five classes; per seed a few-shot training sample
    target_val = out / "data" / "target-val"
    val_idx = pick(test_labels, target_classes, args.test_images if not args.quick else 2, 0)
    if not target_val.is_dir():
        write_folder(target_val, test_images[val_idx], test_labels[val_idx])
    epochs = args.epochs or RECIPES["finetune"]["epochs"]
    results: dict[tuple[str, float], list[tuple[float, float]]] = {}
    for seed in range(args.seeds):
        data = out / "data" / f"target-{args.shots}shot-seed{seed}"
        if not data.is_dir():
            idx = pick(train_labels, target_classes, args.shots, 100 + seed)
            write_folder(data / "train", train_images[idx], train_labels[idx])
            (data / "val").symlink_to(target_val.resolve(), target_is_directory=True)
        for lr in args.lrs:
            for arm in ("fine-tuned", "scratch"):
                start_from = (
                    {"init_checkpoint": str(weights)} if arm == "fine-tuned" else {"layer_decay": 1.0}
                )
                began = time.perf_counter()
                summary = train_classifier(
                    TrainConfig(
                        data=str(data), recipe="finetune", lr_base=lr, epochs=epochs, seed=seed,
                        eval_every=epochs, output=str(out / "runs" / f"{arm}-lr{lr:g}-seed{seed}"),
                        **start_from, **common,
                    )
                )  # fmt: skip
                top1 = float(summary["last"]["top1"])
                results.setdefault((arm, lr), []).append((top1, time.perf_counter() - began))
                print(f"  {arm:<10}  lr_base {lr:<8g} seed {seed}: top-1 {top1:6.2f}%", flush=True)

    start_text = (
        f"start: poolformer_s12 dims {args.dims} at {args.img_size} px, small recipe, {args.start_epochs} "
        f"epochs on {start['train_images']} images of 5 classes: {start['last']['top1']:.2f}% top-1 on "
        f"{start['val_images']} of their test images, trained in {start_seconds:.0f} s (not counted below)"
    )
    names = ", ".join(fm.CLASSES[c] for c in target_classes)
    target_text = (
        f"target: {args.shots} training images a class of {names}; top-1 on their "
        f"{len(val_idx)} test images after {epochs} epochs, recipe "
        f"finetune, {args.seeds} seeds"
    )
    print()
    print(start_text)
    print(target_text)
    print()
    print(f"{'arm':<11} {'lr_base':>8} {'mean':>7} {'std':>6}   per seed                   s/run")
    best: dict[str, tuple[float, float, float]] = {}
    for (arm, lr), rows in results.items():
        accs = [a for a, _ in rows]
        mean = statistics.mean(accs)
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        seconds = statistics.mean(s for _, s in rows)
        seeds = " ".join(f"{a:6.2f}" for a in accs)
        print(f"{arm:<11} {lr:>8g} {mean:7.2f} {std:6.2f}   {seeds:<26} {seconds:5.0f}")
        if arm not in best or mean > best[arm][1]:
            best[arm] = (lr, mean, std)
    (ft_lr, ft_mean, ft_std), (sc_lr, sc_mean, sc_std) = best["fine-tuned"], best["scratch"]
    margin = 2 * max(ft_std, sc_std)
    verdict = "beats" if ft_mean - sc_mean > margin else "does not beat"
    print()
    print(
        f"summary: fine-tuned {ft_mean:.2f} +- {ft_std:.2f}% (lr_base {ft_lr:g}) vs scratch {sc_mean:.2f} +- "
        f"{sc_std:.2f}% (lr_base {sc_lr:g}), each at its best swept lr: the fine-tuned mean {verdict} the "
        f"scratch mean by more than twice the larger std ({ft_mean - sc_mean:+.2f} vs {margin:.2f} points)"
    )


if __name__ == "__main__":
    main()
