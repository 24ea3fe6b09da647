"""errors.py helpers: loader-worker errors read as the worker's own sentence; numbers checked NaN-safely."""

import multiprocessing

import numpy as np
import pytest
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from metaformer.cli import main
from metaformer.errors import ConfigError, DataError, check_number, from_worker


class _Failing(Dataset):
    def __init__(self, error):
        self.error = error

    def __len__(self):
        return 2

    def __getitem__(self, index):
        raise self.error


class _TwoArgs(Exception):
    def __init__(self, a, b):
        super().__init__(f"{a} and {b}")


@pytest.mark.parametrize("workers", [0, 1])
def test_worker_errors_read_as_the_original(workers):
    sentence = "mask m.png is 64x48 but its image is 64x64; masks must match their images"
    with pytest.raises(DataError) as info:
        list(DataLoader(_Failing(DataError(sentence)), num_workers=workers))
    if workers:
        assert "Caught DataError in DataLoader worker process 0" in str(info.value)  # torch's wrapper
    unwrapped = from_worker(info.value)
    assert type(unwrapped) is DataError and str(unwrapped) == sentence
    # from_worker dropped the wrapper's traceback, which held the loader's iterator: the iterator is
    # freed with it, and its worker stopped now, not by a garbage collection that waits 5 s for it
    del info
    assert not multiprocessing.active_children()


def test_a_type_torch_cannot_rebuild_keeps_its_name_and_message():
    with pytest.raises(RuntimeError) as info:
        list(DataLoader(_Failing(_TwoArgs(1, 2)), num_workers=1))
    assert str(from_worker(info.value)) == "_TwoArgs: 1 and 2"
    del info  # the worker stops now (see above)
    assert not multiprocessing.active_children()


def test_segment_train_checks_mask_sizes_before_training(tmp_path, capsys):
    for split in ("train", "val"):
        for i in range(2):
            (tmp_path / "images" / split).mkdir(parents=True, exist_ok=True)
            (tmp_path / "masks" / split).mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "images" / split / f"{i}.png")
            size = (48, 64) if (split, i) == ("val", 1) else (64, 64)
            Image.fromarray(np.zeros(size, np.uint8)).save(tmp_path / "masks" / split / f"{i}.png")
    (tmp_path / "classes.txt").write_text("a\nb\n")
    argv = ["segment", "train", "--data", str(tmp_path), "--output", str(tmp_path / "run"), "--workers", "4"]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.endswith(
        "masks/val/1.png is 64x48 but its image 1.png is 64x64; masks must match their images"
    )


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1.0, [0.5, float("nan")]])
def test_check_number_refuses_nan_inf_and_out_of_range(value):
    with pytest.raises(ConfigError, match="^lr must be positive, got"):
        check_number("lr", value, low=0, low_open=True)
