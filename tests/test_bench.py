"""The benchmark command and its record: arguments are checked before anything is timed, the
table labels what it measures honestly, and the README's headline figures are the record's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from annotated_src.bench import headline
from annotated_src.bench.core import Ceilings, Result, format_table, fraction_of_ceiling

ROOT = Path(__file__).resolve().parents[1]


def _bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "annotated_src.bench", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)


def test_readme_headline_table_is_generated_from_the_record():
    record = json.loads(headline.RECORD.read_text())
    dist = json.loads(headline.DISTRIBUTED.read_text())
    readme = headline.README.read_text()
    assert headline.readme_with_table(readme, record, dist) == readme, (
        "README.md's headline table differs from the record: run python -m annotated_src.bench.headline --write")


def test_every_headline_row_is_in_the_record():
    headline.table(json.loads(headline.RECORD.read_text()))  # raises KeyError naming a missing row


@pytest.mark.parametrize("device", ["tpu", "cuda:x", "not a device"])
def test_bench_rejects_an_unknown_device_before_timing(device):
    proc = _bench("--device", device, "rope")
    assert proc.returncode == 2 and "--device" in proc.stderr and repr(device) in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bench_rejects_a_json_path_in_a_missing_folder_before_timing(tmp_path):
    target = tmp_path / "no-such-folder" / "out.json"
    proc = _bench("--json", str(target), "rope")
    assert proc.returncode == 2 and "--json" in proc.stderr and "does not exist" in proc.stderr
    assert not proc.stdout  # nothing was timed


def test_cpu_rows_show_no_fraction_of_the_ceiling():
    cpu = Ceilings(device="CPU", copy_gbps=10.0, matmul_tflops=1.0, tf32_matmul_tflops=0.5)
    row = Result(suite="s", name="copy (ceiling)", ms=0.01, bytes_moved=1e6)
    assert fraction_of_ceiling(row, cpu) == ""
    assert "no fractions of the ceiling on a CPU" in format_table([row], cpu)


def test_float32_work_is_judged_by_a_float32_ceiling():
    gpu = Ceilings(device="GPU", copy_gbps=1000.0, matmul_tflops=800.0, tf32_matmul_tflops=400.0,
                   fp32_matmul_tflops=50.0)
    row = Result(suite="s", name="tf32", ms=1.0, flops=200e9, flops_dtype="tf32")
    assert fraction_of_ceiling(row, gpu).endswith("50% of TF32 matmul")
    row = Result(suite="s", name="fp32", ms=1.0, flops=20e9, flops_dtype="fp32")
    assert fraction_of_ceiling(row, gpu).endswith("40% of FP32 matmul")
    old_record = Ceilings(device="GPU", copy_gbps=1000.0, matmul_tflops=800.0)  # no float32 ceilings measured
    assert fraction_of_ceiling(row, old_record) == ""
    assert fraction_of_ceiling(Result(suite="s", name="bf16", ms=1.0, flops=200e9), gpu).endswith("25% of bf16 matmul")
    with pytest.raises(ValueError, match="flops_dtype"):
        Result(suite="s", name="x", ms=1.0, flops_dtype="fp8")
