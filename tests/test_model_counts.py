"""The stored model table (``metaformer.model_counts``) against a fresh count of every model."""

import pytest

from metaformer.complexity import count_macs
from metaformer.model_counts import MODEL_COUNTS
from metaformer.models import create_model, list_models
from metaformer.report import count_model, model_table


@pytest.mark.parametrize("name", list_models())
def test_stored_counts_equal_a_fresh_count(name):
    fresh = count_model(name)
    assert MODEL_COUNTS.get(name) == fresh, f'update metaformer/model_counts.py: "{name}": {fresh!r},'


def test_the_table_holds_no_model_that_is_not_registered():
    assert sorted(MODEL_COUNTS) == list_models()


@pytest.mark.parametrize("name", ["poolformer_s12", "metaformer_ppaa_s12_224"])
def test_meta_device_counts_equal_cpu_counts(name):
    """The table is counted on the meta device; attention products must be counted once there too."""
    assert count_model(name)[2] == count_macs(create_model(name), 224)


def test_models_reads_the_table_and_counts_a_model_registered_later(monkeypatch):
    monkeypatch.setitem(MODEL_COUNTS, "poolformer_s12", (1_000_000, 0, 2_000_000_000))
    (row,) = model_table("poolformer_s12")
    assert (row["params_m"], row["gmacs"]) == (1.0, 2.0)
    monkeypatch.delitem(MODEL_COUNTS, "poolformer_s12")
    (row,) = model_table("poolformer_s12")
    assert row["gmacs"] == pytest.approx(1.8227, abs=1e-4)
