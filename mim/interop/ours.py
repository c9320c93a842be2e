"""Params and config from our own training outputs (no optimizer state, any device count).

Accepts a workdir (its latest checkpoint), its `checkpoints/` directory, or one
`checkpoints/<step>` directory. The config comes from `<workdir>/config.json`.
"""
import os
from typing import Optional

import jax
import ml_collections
import numpy as np

from mim import config as config_lib
from mim import paths
from mim.interop import files
from mim.interop.torch_layout import InteropError


def _latest_step_dir(checkpoints: str) -> Optional[str]:
  # Orbax renames a step directory to its bare number only once the save is complete.
  if not paths.isdir(checkpoints):
    return None
  steps = [int(d) for d in paths.listdir(checkpoints) if d.isdigit()]
  return os.path.join(checkpoints, str(max(steps))) if steps else None


def find_step_dir(path: str) -> Optional[str]:
  """The checkpoint step directory `path` names, or None if it is not one of ours."""
  if paths.isdir(os.path.join(path, 'state')):
    return path
  return _latest_step_dir(os.path.join(path, 'checkpoints')) or _latest_step_dir(path)


def update_config(cfg: ml_collections.ConfigDict, values: dict) -> None:
  """Sets the keys of a config.json dict that `cfg` knows (JSON lists back to tuples)."""
  for key, value in values.items():
    if key not in cfg:
      continue
    if isinstance(cfg[key], ml_collections.ConfigDict):
      update_config(cfg[key], value)
    else:
      cfg[key] = tuple(value) if isinstance(cfg[key], tuple) else value


def read_params(step_dir: str) -> dict:
  """The `params` of the TrainState saved in `step_dir/state`, as host numpy arrays."""
  import orbax.checkpoint as ocp  # the checkpoint stack, only when reading our checkpoints
  from etils import epath
  path = epath.Path(paths.absolute(os.path.join(step_dir, 'state')))
  # The item handler itself: a Checkpointer would warn about the step-level metadata it expects.
  handler = ocp.PyTreeCheckpointHandler()
  try:
    meta = handler.metadata(path)
    if 'params' not in meta:
      raise InteropError(f'{path} holds no params (items: {sorted(meta)}).')
    # A partial restore of just the params, as numpy: no optimizer state, no device layout.
    target = {'params': jax.tree.map(lambda m: np.zeros((), m.dtype), meta['params'])}
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
    return handler.restore(path, args=ocp.args.PyTreeRestore(
        item=target, restore_args=restore_args, partial_restore=True))['params']
  finally:
    handler.close()


def load(step_dir: str) -> tuple[ml_collections.ConfigDict, dict]:
  config_path = os.path.join(os.path.dirname(os.path.dirname(paths.absolute(step_dir))),
                             'config.json')
  if not paths.exists(config_path):
    raise InteropError(f'{config_path} not found: the workdir of checkpoint {step_dir} must hold the '
                       "run's config.json.")
  cfg = config_lib.default_config()
  update_config(cfg, files.read_json(config_path))
  return cfg, read_params(step_dir)
