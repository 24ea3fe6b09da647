"""A calibration set of image batches uses its first ``limit`` images, in order, each once."""

import numpy as np
import torch

from metaformer.deploy.quantize import Calibration


def test_calibration_takes_the_first_limit_images_of_its_batches():
    numbered = torch.arange(40, dtype=torch.float32).view(40, 1, 1, 1).expand(40, 3, 2, 2)
    calibration = Calibration([numbered[:25], numbered[25:]], limit=30)
    images = calibration.images()
    assert [int(image[0, 0, 0, 0]) for image in images] == list(range(30))
    assert all(image.shape == (1, 3, 2, 2) and image.dtype == np.float32 for image in images)
    stacked = torch.cat(list(calibration.stacked(batch_size=8)))
    assert torch.equal(stacked, numbered[:30])
