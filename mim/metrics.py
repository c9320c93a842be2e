"""Scalar metric logging: a JSONL file plus TensorBoard event files in the workdir (local or gs://).

The TensorBoard side writes tensorboard's own record format and protos, so no TensorFlow is needed.
"""
import itertools
import json
import math
import os
import socket
import time

from tensorboard.compat.proto import event_pb2
from tensorboard.compat.proto import summary_pb2
from tensorboard.summary.writer.record_writer import RecordWriter

from mim import paths

_EVENT_FILES = itertools.count()  # two writers in one second of one process get distinct files


class MetricWriter:
  """Writes scalars to <workdir>/metrics.jsonl and to TensorBoard events in <workdir>/.

  Each `write` appends one JSON object {"step": step, **metrics} and flushes it, so a resumed run
  continues the same file and a crash loses nothing. Non-finite values are written as JSON `null`
  (strict JSON has no NaN/Infinity); TensorBoard gets the raw value. With enabled=False (e.g. on
  every process but 0 of a multi-host run) nothing is created and every method is a no-op.
  """

  def __init__(self, workdir: str, enabled: bool = True, resume_step: int | None = None):
    """`resume_step`: the checkpoint a run resumes from; JSONL rows logged after it (by the
    interrupted run, before it died) are dropped, since the resumed run logs those steps again."""
    self._enabled = enabled
    if not enabled:
      return
    paths.makedirs(workdir)
    path = os.path.join(workdir, "metrics.jsonl")
    kept = paths.read_text(path).splitlines(keepends=True) if paths.exists(path) else []
    if resume_step is not None:
      kept = [line for line in kept if line.strip() and json.loads(line)["step"] <= resume_step]
    self._jsonl = paths.AppendFile(path, "".join(kept).encode())
    self._jsonl.flush()
    name = (f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}."
            f"{next(_EVENT_FILES)}")
    self._events = RecordWriter(paths.AppendFile(os.path.join(workdir, name)))
    self._add_event(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))

  def _add_event(self, event: event_pb2.Event) -> None:
    self._events.write(event.SerializeToString())
    self._events.flush()

  def write(self, step: int, metrics: dict[str, float]) -> None:
    if not self._enabled:
      return
    step = int(step)
    values = {k: float(v) for k, v in metrics.items()}  # Also accepts numpy / jax scalars.
    record = {"step": step, **{k: v if math.isfinite(v) else None for k, v in values.items()}}
    self._jsonl.write((json.dumps(record, allow_nan=False) + "\n").encode())
    self._jsonl.flush()
    summary = summary_pb2.Summary(
        value=[summary_pb2.Summary.Value(tag=k, simple_value=v) for k, v in values.items()])
    self._add_event(event_pb2.Event(wall_time=time.time(), step=step, summary=summary))

  def __enter__(self) -> "MetricWriter":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def close(self) -> None:
    if not self._enabled:
      return
    self._jsonl.close()
    self._events.close()


def format_duration(seconds: float) -> str:
  """'4m05s', or '2h03m' past an hour (ETAs and run times)."""
  m, s = divmod(int(seconds), 60)
  h, m = divmod(m, 60)
  return f'{h}h{m:02d}m' if h else f'{m}m{s:02d}s'
