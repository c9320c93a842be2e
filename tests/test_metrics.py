"""Tests for mim.metrics.MetricWriter."""
import json
import math
import os

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mim.metrics import MetricWriter


def _read_jsonl(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_jsonl_append_and_tensorboard(tmp_path):
  workdir = str(tmp_path / "run")
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
