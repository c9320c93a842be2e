"""Orbax checkpoints of the train state, the grain iterator position and the resolved config.

Layout: <workdir>/checkpoints/<step>/{state, data_iter, config}. Saves are asynchronous. Orbax
writes a step into a temporary directory and renames it to <step> only once complete, and it
deletes old steps (max_to_keep) only after the new one is committed, so a crash mid-save leaves
the previous checkpoint intact. A step that fails to restore is renamed <step>.unreadable and
the next older one is tried.
"""
import os
from typing import Any, Callable, Optional

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils


class CheckpointError(RuntimeError):
  """No usable checkpoint where one was expected; the message says which and what to do."""


def manager(directory: str, max_to_keep: int = 3, keep_every_steps: int = 0
            ) -> ocp.CheckpointManager:
  """A manager for `directory` (Orbax needs it absolute); `keep_every_steps` > 0 also keeps
  every step divisible by it, beyond the `max_to_keep` most recent."""
  return ocp.CheckpointManager(os.path.abspath(directory), options=ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, keep_period=keep_every_steps or None,
      enable_async_checkpointing=True, create=True))


def save(mngr: ocp.CheckpointManager, step: int, state: Any, data_iter, config: dict) -> None:
  mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                          data_iter=grain.checkpoint.CheckpointSave(data_iter),
                                          config=ocp.args.JsonSave(config)),
            force=True)


def has_iterator_state(mngr: ocp.CheckpointManager, step: int) -> bool:
  """Whether `step` holds a data-iterator state for this process layout (grain saves one file
  per process, so a checkpoint from another process count has none that fits)."""
  name = f'process_{jax.process_index()}-of-{jax.process_count()}.json'
  return os.path.exists(os.path.join(str(mngr.directory), str(step), 'data_iter', name))


def restore_latest(mngr: ocp.CheckpointManager, abstract_state: Any,
                   make_data_iter: Callable[[int], Any], set_aside: bool = True
                   ) -> tuple[Optional[int], Any, Any, bool]:
  """Restores the newest readable checkpoint onto the shardings in `abstract_state`.

  `make_data_iter(start_batch)` builds the data iterator; it is moved to the saved position when
  the checkpoint has an iterator state for this process layout, else started at the step.
  Returns (step, state, data_iter, iterator_restored); (None, None, make_data_iter(0), False)
  when there is no checkpoint. Unreadable steps are skipped with a warning naming them and, with
  `set_aside`, renamed <step>.unreadable (not for another run's directory).
  """
  failures = []
  result = None
  for step in sorted(mngr.all_steps(), reverse=True):
    fits = has_iterator_state(mngr, step)
    data_iter = make_data_iter(0 if fits else step)
    items = dict(state=ocp.args.StandardRestore(abstract_state))
    if fits:
      items['data_iter'] = grain.checkpoint.CheckpointRestore(data_iter)
    try:
      state = mngr.restore(step, args=ocp.args.Composite(**items))['state']
    except Exception as e:  # pylint: disable=broad-except  (orbax/tensorstore raise many types)
      reason = f'{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}'[:300]
      logging.warning('Checkpoint %s/%d is unreadable (%s); trying the previous one.',
                      mngr.directory, step, reason)
      print(f'warning: checkpoint {mngr.directory}/{step} is unreadable ({reason}); '
            'falling back to the previous one.', flush=True)
      failures.append((step, reason))
      continue
    result = (step, state, data_iter, fits)
    break
  if failures and set_aside:
    _set_aside(mngr, [step for step, _ in failures])
  if result:
    return result
  if failures:
    listed = '; '.join(f'step {s}: {r}' for s, r in failures)
    raise CheckpointError(
        f'No readable checkpoint in {mngr.directory} ({listed}).'
        + (' They were renamed to <step>.unreadable; rerun to start from scratch, or point '
           '--config.init_from at good weights.' if set_aside else ''))
  return None, None, make_data_iter(0), False


def _set_aside(mngr: ocp.CheckpointManager, steps: list[int]) -> None:
  """Renames unreadable steps out of Orbax's view, so later saves of those steps can happen."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices('checkpoint restore attempts done')
  if jax.process_index() == 0:
    for step in steps:
      path = os.path.join(str(mngr.directory), str(step))
      target, n = path + '.unreadable', 1
      while os.path.exists(target):  # an earlier fallback already set this step aside
        target, n = f'{path}.unreadable{n}', n + 1
      os.replace(path, target)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices('unreadable checkpoints set aside')
  mngr.reload()


def abstract_with_shardings(abstract_tree: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract_tree, shardings)
