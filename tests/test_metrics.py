"""Tests for mim.metrics.MetricWriter."""
import json
import math
import os

import jax
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mim import paths
from mim.metrics import MetricWriter


def _read_jsonl(workdir):
  return [json.loads(line) for line in
          paths.read_text(os.path.join(workdir, "metrics.jsonl")).splitlines()]


def test_jsonl_append_and_tensorboard(storage):
  """Local or gs://: TensorBoard's own reader (over fsspec for gs://) sees every point."""
  workdir = f"{storage}/run"
  writer = MetricWriter(workdir)
  for step in (1, 2, 3):
    writer.write(step, {"train/loss": 1.0 / step, "lr": 0.5 * step})
  writer.close()

  records = _read_jsonl(workdir)
  assert len(records) == 3
  assert [r["step"] for r in records] == [1, 2, 3]
  assert all(set(r) == {"step", "train/loss", "lr"} for r in records)
  assert records[1]["train/loss"] == 0.5 and records[2]["lr"] == 1.5

  # A resumed run appends to the same file.
  writer = MetricWriter(workdir)
  writer.write(4, {"train/loss": 0.25, "lr": 2.0})
  writer.write(5, {"train/loss": 0.2, "lr": 2.5})
  writer.close()
  records = _read_jsonl(workdir)
  assert len(records) == 5
  assert [r["step"] for r in records] == [1, 2, 3, 4, 5]

  acc = EventAccumulator(workdir)
  acc.Reload()
  assert set(acc.Tags()["scalars"]) == {"train/loss", "lr"}
  loss = acc.Scalars("train/loss")
  assert [e.step for e in loss] == [1, 2, 3, 4, 5]
  assert [e.value for e in loss] == pytest.approx([1.0, 0.5, 1 / 3, 0.25, 0.2], rel=1e-6)
  assert [e.value for e in acc.Scalars("lr")] == pytest.approx([0.5, 1.0, 1.5, 2.0, 2.5])


def test_non_finite_written_as_null(tmp_path):
  writer = MetricWriter(str(tmp_path))
  writer.write(7, {"loss": float("nan"), "grad_norm": float("inf"), "lr": 0.1})
  writer.close()
  with open(tmp_path / "metrics.jsonl") as f:
    line = f.read()
  assert "NaN" not in line and "Infinity" not in line
  assert json.loads(line) == {"step": 7, "loss": None, "grad_norm": None, "lr": 0.1}

  acc = EventAccumulator(str(tmp_path))
  acc.Reload()
  assert math.isnan(acc.Scalars("loss")[0].value)


def test_disabled_writer_creates_nothing(tmp_path):
  workdir = tmp_path / "run"
  writer = MetricWriter(str(workdir), enabled=False)
  writer.write(1, {"loss": 1.0})
  writer.close()
  assert not workdir.exists()


def test_peak_flops_tables_and_best_cpu_peak_kept(tmp_path, monkeypatch):
  """MFU's denominator: datasheet peaks by device kind and dtype (fp32 = TF32 on NVIDIA), the
  override per device, and on CPU the best matmul rate this host has shown, cached: a slower
  measurement (cores shared with other work) does not lower it, a faster one raises it.
  Simulated devices of one process share the host's peak."""
  from mim import flops
  assert flops.table_peak('TPU v5 lite', 'bfloat16') == 197e12
  assert flops.table_peak('NVIDIA H100 80GB HBM3', 'float32') == 495e12
  assert flops.table_peak('NVIDIA H100 80GB HBM3', 'bfloat16') == 989e12
  assert flops.table_peak('cpu') is None
  rates = iter([1e11, 3e11, 2e11])
  calls = []
  monkeypatch.setattr(flops, '_CACHE', str(tmp_path / 'peak.json'))
  monkeypatch.setattr(flops, 'measure_matmul_peak',
                      lambda dtype, reps: calls.append(dtype) or next(rates))
  devices = jax.devices()
  peaks = [flops.total_peak_flops(devices, 'float32') / jax.process_count() for _ in range(3)]
  assert peaks == [1e11, 3e11, 3e11] and calls == ['float32'] * 3
  assert list(json.loads((tmp_path / 'peak.json').read_text()).values()) == [3e11]
  assert flops.total_peak_flops(devices, 'float32', override_tflops=2.0) == 2e12 * len(devices)


def test_scale_plan_step_times_follow_flops_and_the_table():
  """The planner's expected step time is FLOPs / (devices x datasheet peak), / MFU."""
  from mim import config as config_lib, flops, masking, summary, teacher
  from mim.models import mae
  cfg = config_lib.load('configs/mae_vitb.py')
  text = summary.scale_plan(cfg, mfu=0.5)
  spec = mae.spec_from_config(cfg.model)
  step = flops.train_flops_per_image(spec, masking.num_keep(spec.num_patches, 0.75),
                                     teacher.needed_signals(cfg)) * cfg.batch_size
  ideal_ms = step / (8 * 989e12) * 1e3
  line = next(l for l in text.splitlines() if '8xH100' in l)
  assert f'{ideal_ms:.1f} ms / ' in line and f'{2 * ideal_ms:.1f} ms;' in line
  assert f'{cfg.batch_size // 8} images per device' in line
