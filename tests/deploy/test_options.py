import pytest

from metaformer.deploy.options import compare_with_fp32


def test_compare_with_fp32_fails_beyond_max_drop():
    ok = compare_with_fp32("mIoU", 59.5, 60.0, 95.0, precision="int8", max_drop=1.0)
    assert "failed" not in ok and ok["drop"] == pytest.approx(0.5) and ok["agreement"] == pytest.approx(95.0)
    bad = compare_with_fp32("mIoU", 58.0, 60.0, 95.0, precision="int8", max_drop=1.0)
    assert "int8 mIoU is 2.00 points below fp32 (58.00 vs 60.00)" in bad["failed"]
    assert "--max-drop 1;" in bad["failed"]


def test_compare_with_fp32_writes_the_metric_with_its_unit():
    bad = compare_with_fp32("top-1", 90.0, 95.5, 97.0, precision="bf16", max_drop=0.5, unit="%")
    assert bad["failed"].startswith("bf16 top-1 is 5.50 points below fp32 (90.00% vs 95.50%)")
    assert list(bad) == ["agreement", "drop", "max_drop", "failed"]  # the order the JSON output keeps
