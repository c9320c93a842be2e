"""SIGTERM / SIGINT become a request to stop cleanly: finish the step, save, exit 0.

Schedulers (TPU maintenance, SLURM preemption, Kubernetes) send SIGTERM some seconds before
killing a job. A second SIGINT (Ctrl-C twice) interrupts at once.
"""
import signal

import jax
import numpy as np
from jax.experimental import multihost_utils


class StopRequest:
  """Context manager that records SIGTERM/SIGINT and restores the previous handlers on exit."""

  def __init__(self):
    self.signal_name = None
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

  def _handle(self, signum, frame):
    del frame
    self.signal_name = signal.Signals(signum).name
    if signum == signal.SIGINT:
      signal.signal(signal.SIGINT, self._previous[signal.SIGINT])

  def requested(self, agree: bool = True) -> bool:
    """Whether to stop now. With one process, as soon as a signal came. With several, all must
    stop at the same step to save together, so they agree only where `agree` is True (the loop
    passes its log and checkpoint steps): the all-gather blocks the host from queueing the next
    step, so it must not run every step. A signal therefore takes effect at the next such step."""
    local = self.signal_name is not None
    if jax.process_count() == 1:
      return local
    if not agree:
      return False
    return bool(np.any(multihost_utils.process_allgather(np.array(local))))


def stopped_message(stop: StopRequest, step: int, checkpoint_dir: str) -> str:
  """What the run prints when a signal ended it (after its checkpoint was saved)."""
  return (f'Stopped by {stop.signal_name or "a signal on another process"} after step {step}; '
          f'checkpoint saved in {checkpoint_dir}/{step}. Rerun the same command to resume.')
