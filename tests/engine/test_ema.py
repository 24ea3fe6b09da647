"""The loop's EMA moves with the model: after a few optimizer steps at a known decay its weights are the
closed-form average of the model's weights after each step."""

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from metaformer.engine.loop import RunConfig, fit

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

DECAY = 0.6


class RecordingTask:
    """Least squares on a linear model; records the weights each batch sees (the last optimizer step's)."""

    primary_metric = "neg_loss"

    def __init__(self):
        self.seen: list[dict[str, torch.Tensor]] = []

    def train_step(self, model, batch):
        self.seen.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        x, y = batch
        return ((model(x) - y) ** 2).mean(), len(x)

    def evaluate(self, model, loader):
        loss = sum(float(((model(x) - y) ** 2).mean()) for x, y in loader)
        return {"loss": loss, "neg_loss": -loss}

    def save_weights(self, model, path):
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))


def ema_closed_form(after_steps: list[dict[str, torch.Tensor]], decay: float) -> dict[str, torch.Tensor]:
    """timm's ModelEmaV3 as the loop builds it (no warmup, update_after_step 0): the first update takes
    the model's weights whole, each later one keeps ``decay`` of the average. With w_k the weights after
    step k of n: ema = decay^(n-1) w_1 + sum_{k>=2} (1 - decay) decay^(n-k) w_k."""
    n = len(after_steps)
    return {
        name: decay ** (n - 1) * after_steps[0][name]
        + sum((1 - decay) * decay ** (n - k) * after_steps[k - 1][name] for k in range(2, n + 1))
        for name in after_steps[0]
    }


@pytest.mark.parametrize("accum_steps", [1, 2])
def test_ema_weights_are_the_average_of_the_weights_after_each_step(tmp_path, accum_steps):
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    x, y = torch.randn(24, 4), torch.randn(24, 2)
    batches = [(x[i : i + 4], y[i : i + 4]) for i in range(0, 24, 4)]  # 6 batches, one epoch
    task = RecordingTask()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2)
    config = RunConfig(epochs=1, output_dir=str(tmp_path / "run"), ema_decay=DECAY, accum_steps=accum_steps)
    fit(task, model, optimizer, None, batches, batches[:1], config)
    # the weights after each optimizer step: what the batch after it saw, and the final weights
    after_steps = task.seen[accum_steps::accum_steps] + [model.state_dict()]
    assert len(after_steps) == 6 // accum_steps
    assert not torch.equal(after_steps[-1]["weight"], after_steps[-2]["weight"])  # the model moved
    ema = load_file(str(tmp_path / "run" / "last.safetensors"))  # the weights a user deploys
    for name, expected in ema_closed_form(after_steps, DECAY).items():
        torch.testing.assert_close(ema[name], expected, rtol=0, atol=1e-6)
