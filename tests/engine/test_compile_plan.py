"""compile_plan.py: --compile auto's decision from fake step times and records, and the record file."""

import json

import pytest
import torch

from metaformer.engine import compile_plan
from metaformer.engine.compile_plan import CompileRecord, decide
from metaformer.errors import ConfigError


def test_the_digits_demo_does_not_pay_a_compile_back():
    # the demo: about 10 epochs of 22 steps at ~20 ms a step on a CPU
    decision = decide("auto", steps=220, eager_step_s=0.02, blocks=4)
    assert not decision.used
    assert decision.expected_compile_s == compile_plan.assumed_compile_seconds(4) == 90.0
    assert "cold, assumed" in decision.reason and "auto:" in decision.reason


def test_a_long_run_compiles_without_a_record():
    # ImageNet-sized: 300 epochs x 1000 steps of 0.5 s; 10% of that is far above 180 s
    decision = decide("auto", steps=300_000, eager_step_s=0.5, blocks=12)
    assert decision.used and decision.expected_saving_s == pytest.approx(15_000)


def test_a_warm_cache_makes_a_short_run_worth_compiling():
    record = CompileRecord(cold_compile_s=180.0, warm_compile_s=8.0, eager_step_s=0.4, compiled_step_s=0.3)
    steps = 200  # saves 200 x 0.4 x 25% = 20 s
    assert not decide("auto", steps=steps, eager_step_s=0.4, record=record, cache_warm=False).used
    warm = decide("auto", steps=steps, eager_step_s=0.4, record=record, cache_warm=True)
    assert warm.used and warm.expected_compile_s == 8.0 and "25% measured" in warm.reason


def test_a_measured_slowdown_keeps_auto_eager():
    record = CompileRecord(cold_compile_s=60.0, warm_compile_s=5.0, eager_step_s=0.4, compiled_step_s=0.5)
    assert not decide("auto", steps=10**7, eager_step_s=0.4, record=record, cache_warm=True).used


def test_on_and_off_are_taken_as_asked_and_a_bogus_choice_is_one_sentence():
    assert decide("on", steps=1, eager_step_s=0.0).used
    assert not decide("off", steps=10**9, eager_step_s=1.0).used
    with pytest.raises(ConfigError, match="compile"):
        decide("sometimes", steps=1, eager_step_s=0.0)


def test_records_merge_and_an_unreadable_file_counts_as_none(tmp_path):
    compile_plan.write_record("k", CompileRecord(cold_compile_s=100.0, eager_step_s=0.2), tmp_path)
    compile_plan.write_record("k", CompileRecord(warm_compile_s=4.0, compiled_step_s=0.15), tmp_path)
    merged = compile_plan.read_records(tmp_path)["k"]
    assert merged == CompileRecord(100.0, 4.0, 0.2, 0.15) and merged.speedup == pytest.approx(0.25)
    (tmp_path / compile_plan.RECORD_FILE).write_text("{not json")
    assert compile_plan.read_records(tmp_path) == {}
    compile_plan.write_record("k", CompileRecord(cold_compile_s=1.0), tmp_path)  # rewrites it
    assert json.loads((tmp_path / compile_plan.RECORD_FILE).read_text())["k"]["cold_compile_s"] == 1.0


def test_the_key_names_model_shapes_input_device_dtype_layout_and_checkpointing():
    from metaformer import create_model

    model = create_model("poolformer_s12", depths=[1, 1, 1, 1], dims=[8, 8, 16, 16], num_classes=3)
    batch = (torch.randn(2, 3, 32, 32), torch.zeros(2, dtype=torch.long))
    key = compile_plan.record_key(model, batch, torch.device("cpu"), None)
    assert key.startswith("MetaFormer-") and "2x3x32x32-cpu-fp32-nchw-nockpt-torch" in key
    cl = (batch[0].contiguous(memory_format=torch.channels_last), batch[1])
    assert "-bfloat16-cl-" in compile_plan.record_key(model, cl, torch.device("cpu"), torch.bfloat16)
    model.set_grad_checkpointing(True)
    assert "-ckpt-" in compile_plan.record_key(model, batch, torch.device("cpu"), None)
    wider = create_model("poolformer_s12", depths=[1, 1, 1, 1], dims=[8, 8, 16, 32], num_classes=3)
    assert compile_plan.record_key(wider, batch, torch.device("cpu"), None) != key


def test_the_recorded_compile_time_is_the_first_compiled_steps_extra_time(tmp_path, monkeypatch):
    """The backward compiles lazily inside the first compiled step, after the forward's call returned:
    the record (and the summary) count the whole first step beyond a compiled step's time."""
    from types import SimpleNamespace

    from metaformer import create_model

    model = create_model("poolformer_s12", depths=[1, 1, 1, 1], dims=[8, 8, 16, 16], num_classes=3)
    compiled = SimpleNamespace(compiled=True, compile_seconds=3.0, cache_hit=False, failure=None)
    monkeypatch.setattr(compile_plan, "compile_module", lambda *args, **kwargs: compiled)
    switch = compile_plan.CompileSwitch(
        "on", model, steps=100, device=torch.device("cpu"), dtype=None, eager_module=model, home=tmp_path
    )
    batch = (torch.randn(2, 3, 32, 32), torch.zeros(2, dtype=torch.long))
    assert switch.module_for_step(batch) is compiled
    for seconds in (20.0, 1.0, 1.2, 0.8, 1.0, 1.1):  # the first step compiles forward and backward
        switch.step_done(seconds)
    assert switch.summary()["compile_seconds"] == pytest.approx(19.0)
    record = compile_plan.read_records(tmp_path)[switch.key]
    assert record.cold_compile_s == pytest.approx(19.0) and record.compiled_step_s == pytest.approx(1.0)
