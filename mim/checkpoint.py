"""Orbax checkpoints of the train state together with the grain iterator position.

Layout: <workdir>/checkpoints/<step>/{state, data_iter}. Saves are asynchronous; Orbax commits a
step directory only once it is complete, so a crash mid-save leaves the previous one intact.
"""
import os
from typing import Any, Optional

import grain
import jax
import orbax.checkpoint as ocp


def manager(workdir: str, max_to_keep: int) -> ocp.CheckpointManager:
  directory = os.path.join(os.path.abspath(workdir), 'checkpoints')  # Orbax needs absolute paths
  return ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, enable_async_checkpointing=True, create=True))


def save(mngr: ocp.CheckpointManager, step: int, state: Any, data_iter) -> None:
  mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                          data_iter=grain.checkpoint.CheckpointSave(data_iter)),
            force=True)


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state: Any,
            data_iter: Optional[Any] = None) -> Any:
  """Restores `state` (onto the shardings in `abstract_state`) and, if given, moves `data_iter`
  to the saved position in place."""
  items = dict(state=ocp.args.StandardRestore(abstract_state))
  if data_iter is not None:
    items['data_iter'] = grain.checkpoint.CheckpointRestore(data_iter)
  return mngr.restore(step, args=ocp.args.Composite(**items))['state']


def has_iterator_state(mngr: ocp.CheckpointManager, step: int) -> bool:
  """Whether `step` holds a data-iterator state for this process layout (grain saves one file
  per process, so a checkpoint from another process count has none that fits)."""
  name = f'process_{jax.process_index()}-of-{jax.process_count()}.json'
  return os.path.exists(os.path.join(str(mngr.directory), str(step), 'data_iter', name))


def abstract_with_shardings(abstract_tree: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract_tree, shardings)
