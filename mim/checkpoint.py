"""Orbax checkpoints of the train state, the grain iterator position and the resolved config.

Layout: <workdir>/checkpoints/<step>/{state, data_iter, config}. Saves are asynchronous. Orbax
writes a step into a temporary directory and renames it to <step> only once complete (on gs://
it writes <step> in place and marks it complete with commit_success.txt), and it deletes old
steps (max_to_keep) only after the new one is committed, so a crash mid-save leaves the previous
checkpoint intact. The unfinished save is named and removed when the run starts again.

On restore, three failures are told apart:
- a checkpoint that is readable but does not fit this config (tree structure, shapes, dtypes,
  read from its metadata before any array) stops the run with `CheckpointMismatch`, naming the
  entries and the config keys that differ; nothing is renamed or touched;
- transient errors (OSError other than a missing file, MemoryError) are retried, then raised as
  they are; nothing is renamed;
- data that cannot be read (corrupt metadata, truncated files, missing array chunks) is set
  aside as <step>.unreadable and the next older step is tried.
"""
import json
import os
import time
from typing import Any, Callable, Optional

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils
from orbax.checkpoint._src.serialization import type_handler_registry

from mim import paths

TRANSIENT_RETRIES = 3
# Orbax saves an array replicated over R devices as R slices, one written by each replica (its
# default off GPU). Cutting a slice is one device op: below about 1 MiB it costs more than the
# write it shares (a tiny test model on 8 simulated CPU devices: ~2,500 slices, 5 s a save).
# Smaller slices are written whole by the first replica; the files read back the same either way.
# (The registry's own `add`: the public register_type_handler logs a warning on every start.)
MIN_REPLICA_SLICE_BYTES = 1 << 20
type_handler_registry.GLOBAL_TYPE_HANDLER_REGISTRY.add(jax.Array, ocp.type_handlers.ArrayHandler(
    min_slice_bytes_for_replica_parallel=MIN_REPLICA_SLICE_BYTES), override=True,
    ignore_warnings=True)
# Config sections that shape the train state: listed first among the differing keys.
STATE_SECTIONS = ('model', 'optim', 'targets', 'masking', 'teacher', 'loss_predictor', 'finetune')


class CheckpointError(RuntimeError):
  """No usable checkpoint where one was expected; the message says which and what to do."""


class CheckpointMismatch(CheckpointError):
  """A readable checkpoint that does not fit the current config (left untouched)."""


def manager(directory: str, max_to_keep: int = 3, keep_every_steps: int = 0,
            remove_unfinished: bool = False) -> ocp.CheckpointManager:
  """A manager for `directory` (local or gs://; Orbax needs it absolute); `keep_every_steps` > 0
  also keeps every step divisible by it, beyond the `max_to_keep` most recent.

  `remove_unfinished` is for the run that owns `directory`, as it starts: saves that a kill cut
  off before Orbax committed them (a local <step>.orbax-checkpoint-tmp-* folder, a gs:// <step>
  folder without commit_success.txt) hold no usable checkpoint; each is named, then deleted.
  Left alone, a local one would keep its disk space for good. Never for a directory another
  process may be writing (an init_from source, a watched workdir)."""
  directory = paths.absolute(directory)
  if remove_unfinished and jax.process_index() == 0:
    for unfinished in ocp.utils.tmp_checkpoints(directory):
      print(f'Removing {unfinished.get()}: a save cut off before it was committed (it holds no '
            'usable checkpoint).', flush=True)
  return ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, keep_period=keep_every_steps or None,
      enable_async_checkpointing=True, create=True, cleanup_tmp_directories=remove_unfinished))


def save(mngr: ocp.CheckpointManager, step: int, state: Any, data_iter, config: dict) -> None:
  mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                          data_iter=grain.checkpoint.CheckpointSave(data_iter),
                                          config=ocp.args.JsonSave(config)),
            force=True)


def has_iterator_state(mngr: ocp.CheckpointManager, step: int) -> bool:
  """Whether `step` holds a data-iterator state for this process layout (grain saves one file
  per process, so a checkpoint from another process count has none that fits)."""
  name = f'process_{jax.process_index()}-of-{jax.process_count()}.json'
  return paths.exists(os.path.join(str(mngr.directory), str(step), 'data_iter', name))


# ------------------------------------------------------------------ metadata and comparison

def _key_str(key) -> str:
  for attr in ('key', 'name', 'idx'):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def flat_signature(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
  """{'opt_state/0/mu/encoder/...': (shape, dtype)} for arrays, ShapeDtypeStructs or Orbax
  metadata; tuples and namedtuples flatten to the same paths as the lists and dicts Orbax stores."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {'/'.join(_key_str(k) for k in path): (tuple(leaf.shape), str(leaf.dtype))
          for path, leaf in leaves}


def _retry(fn: Callable[[], Any]) -> Any:
  """fn(), retried on transient errors; the last one is raised as it is."""
  for attempt in range(TRANSIENT_RETRIES):
    try:
      return fn()
    except Exception as e:  # pylint: disable=broad-except
      if not is_transient(e) or attempt == TRANSIENT_RETRIES - 1:
        raise
      logging.warning('Transient error reading a checkpoint (%r); retrying.', e)
      time.sleep(2 ** attempt)


def is_transient(e: BaseException) -> bool:
  """An error worth retrying, never a sign of corrupt data (a missing file is)."""
  return isinstance(e, MemoryError) or (isinstance(e, OSError)
                                        and not isinstance(e, FileNotFoundError))


def read_state_metadata(step_dir: str) -> Any:
  """The saved state's tree of ArrayMetadata (no array is read)."""
  handler = ocp.PyTreeCheckpointHandler()
  try:
    return handler.metadata(epath.Path(paths.absolute(os.path.join(step_dir, 'state')))).tree
  finally:
    handler.close()


def read_saved_config(step_dir: str) -> Optional[dict]:
  try:
    return json.loads(paths.read_text(os.path.join(step_dir, 'config', 'metadata')))
  except (OSError, ValueError):
    return None


def _flat_config(d: dict, prefix: str = '') -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat_config(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = tuple(v) if isinstance(v, list) else v
  return out


def config_differences(saved: Optional[dict], current: Optional[dict]) -> list[str]:
  """`key: saved -> current` for differing config values, state-shaping sections first."""
  if saved is None or current is None:
    return []
  a, b = _flat_config(saved), _flat_config(json.loads(json.dumps(current)))
  keys = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
  keys.sort(key=lambda k: k.split('.')[0] not in STATE_SECTIONS)
  return [f'{k}: {a.get(k, "(absent)")!r} -> {b.get(k, "(absent)")!r}' for k in keys]


def _group(entries: list[str], depth: int = 2) -> list[str]:
  """Entry paths cut to their first `depth` components, deduplicated in order."""
  return list(dict.fromkeys('/'.join(p.split('/')[:depth]) for p in entries))


def signature_differences(saved: dict, wanted: dict, step: int) -> list[str]:
  """One line per differing entry group between a checkpoint's signature and the config's."""
  only_saved = [p for p in saved if p not in wanted]
  only_wanted = [p for p in wanted if p not in saved]
  lines = [f'{g}: present in checkpoint {step}, absent in this config' for g in _group(only_saved)]
  lines += [f'{g}: present in this config, absent in checkpoint {step}' for g in _group(only_wanted)]
  for p in (p for p in wanted if p in saved and saved[p] != wanted[p]):
    (s_shape, s_dtype), (w_shape, w_dtype) = saved[p], wanted[p]
    lines.append(f'{p}: {s_dtype}{list(s_shape)} in checkpoint {step}, '
                 f'{w_dtype}{list(w_shape)} in this config')
  return lines


def mismatch_message(step_dir: str, lines: list[str], config: Optional[dict]) -> str:
  workdir = os.path.dirname(os.path.dirname(step_dir))
  shown = '; '.join(lines[:6]) + (f'; and {len(lines) - 6} more' if len(lines) > 6 else '')
  keys = config_differences(read_saved_config(step_dir), config)
  cause = (f' Config keys that differ from the checkpoint\'s: {"; ".join(keys[:6])}.' if keys
           else '')
  return (f'Checkpoint {step_dir} does not fit this config ({shown}).{cause} It was left '
          'untouched. Either rerun with the config it was saved with, or continue it in a new '
          f'workdir: --config.init_from={workdir} --config.init_from_state=True (keeps the step, '
          'the data position and every state entry that fits; the rest starts fresh), or '
          f'--config.init_from={workdir} alone (params only, from step 0).')


# ------------------------------------------------------------------ restore

def restore_latest(mngr: ocp.CheckpointManager, abstract_state: Any,
                   make_data_iter: Callable[[int], Any], set_aside: bool = True,
                   config: Optional[dict] = None) -> tuple[Optional[int], Any, Any, bool]:
  """Restores the newest readable checkpoint onto the shardings in `abstract_state`.

  `make_data_iter(start_batch)` builds the data iterator; it is moved to the saved position when
  the checkpoint has an iterator state for this process layout (else it starts at the step).
  Returns (step, state, data_iter, iterator_restored); (None, None, make_data_iter(0), False)
  when there is no checkpoint. A checkpoint that does not fit raises CheckpointMismatch before
  anything is renamed; unreadable steps are skipped with a warning naming them and, with
  `set_aside`, renamed <step>.unreadable once a readable one is found or none is left. `config`
  (the current config as a dict) lets the mismatch error name the keys that changed.
  """
  wanted = flat_signature(abstract_state)
  failures = []
  result = None
  for step in sorted(mngr.all_steps(), reverse=True):
    step_dir = os.path.join(str(mngr.directory), str(step))
    try:
      saved = flat_signature(_retry(lambda: read_state_metadata(step_dir)))
      if saved != wanted:
        raise CheckpointMismatch(mismatch_message(
            step_dir, signature_differences(saved, wanted, step), config))
      state = _retry(lambda: mngr.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state))))['state']
    except CheckpointMismatch:
      raise
    except Exception as e:  # pylint: disable=broad-except  (orbax/tensorstore raise many types)
      if is_transient(e):
        raise
      reason = f'{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}'[:300]
      logging.warning('Checkpoint %s is unreadable (%s); trying the previous one.', step_dir, reason)
      print(f'warning: checkpoint {step_dir} is unreadable ({reason}); falling back to the '
            'previous one.', flush=True)
      failures.append((step, reason))
      continue
    data_iter, fits = restore_data_iter(mngr, step, make_data_iter)
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


def restore_data_iter(mngr, step: int, make_data_iter) -> tuple[Any, bool]:
  """The data iterator at the saved position of `step`; if this process layout has none, or it
  does not fit the current data config, the stream restarts at batch `step` (nothing is lost:
  the state is already restored)."""
  if has_iterator_state(mngr, step):
    data_iter = make_data_iter(0)
    try:
      _retry(lambda: mngr.restore(step, args=ocp.args.Composite(
          data_iter=grain.checkpoint.CheckpointRestore(data_iter))))
      return data_iter, True
    except Exception as e:  # pylint: disable=broad-except
      if is_transient(e):
        raise
      print(f'warning: the data-iterator state of checkpoint {mngr.directory}/{step} does not fit '
            f'this data config ({type(e).__name__}); the data stream restarts at batch {step}.',
            flush=True)
  return make_data_iter(step), False


def restore_fitting(step_dir: str, abstract_state: Any, fresh_state: Any
                    ) -> tuple[Any, list[str], list[str]]:
  """`fresh_state` with every entry whose path, shape and dtype match the checkpoint in
  `step_dir` replaced by the saved value (onto the shardings of `abstract_state`).

  Returns (state, restored entry groups, fresh entry groups): how a run continues under a
  config that grew the state (a new head, an EMA copy) or changed the optimizer chain."""
  meta = _retry(lambda: read_state_metadata(step_dir))
  saved = flat_signature(meta)
  wanted = {p: (leaf, sig) for (p, sig), leaf in
            zip(flat_signature(abstract_state).items(), jax.tree.leaves(abstract_state))}
  saved_paths = ['/'.join(_key_str(k) for k in path)
                 for path, _ in jax.tree_util.tree_flatten_with_path(meta)[0]]
  item = jax.tree.unflatten(jax.tree.structure(meta), [
      wanted[p][0] if p in wanted and wanted[p][1] == saved[p] else ocp.PLACEHOLDER
      for p in saved_paths])
  handler = ocp.PyTreeCheckpointHandler()
  try:
    restored = _retry(lambda: handler.restore(
        epath.Path(paths.absolute(os.path.join(step_dir, 'state'))),
        args=ocp.args.PyTreeRestore(item=item,
                                    restore_args=ocp.checkpoint_utils.construct_restore_args(item))))
  finally:
    handler.close()
  leaves = jax.tree.leaves(restored, is_leaf=lambda x: x is ...)
  values = {p: v for p, v in zip(saved_paths, leaves) if v is not ...}
  fresh_paths = [p for p in wanted if p not in values]
  flat, treedef = jax.tree_util.tree_flatten_with_path(fresh_state)
  state = jax.tree.unflatten(treedef, [
      values.get('/'.join(_key_str(k) for k in path), leaf) for path, leaf in flat])
  restored_groups = _group([p for p in wanted if p in values])
  return state, restored_groups, _group(fresh_paths)


def _set_aside(mngr: ocp.CheckpointManager, steps: list[int]) -> None:
  """Renames unreadable steps out of Orbax's view, so later saves of those steps can happen."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices('checkpoint restore attempts done')
  if jax.process_index() == 0:
    for step in steps:
      path = os.path.join(str(mngr.directory), str(step))
      target, n = path + '.unreadable', 1
      while paths.exists(target):  # an earlier fallback already set this step aside
        target, n = f'{path}.unreadable{n}', n + 1
      paths.rename(path, target)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices('unreadable checkpoints set aside')
  mngr.reload()


def abstract_with_shardings(abstract_tree: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract_tree, shardings)
