"""Device mesh (data, fsdp, tensor) and the logical-axis rules that place params and activations.

Modules name their axes logically ('embed', 'mlp', 'heads', 'kv' for parameters; 'batch',
'length', 'act_*' for activations); these rules map the names onto mesh axes. The default puts
every parameter's embed dimension on `fsdp` (ZeRO-3-like) and the batch on data x fsdp.
"""
import contextlib
import math
import os

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ('data', 'fsdp', 'tensor')

LOGICAL_RULES = (
    ('batch', ('data', 'fsdp')),
    ('length', None),
    ('act_embed', None),
    ('act_mlp', 'tensor'),
    ('act_heads', 'tensor'),
    ('embed', 'fsdp'),
    ('mlp', 'tensor'),
    ('heads', 'tensor'),
    ('kv', None),
)


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None, process_id: int | None = None,
                           auto: bool | None = None) -> None:
  """Starts JAX's multi-controller runtime before anything touches the devices.

  Explicit arguments (or MIM_COORDINATOR_ADDRESS / MIM_NUM_PROCESSES / MIM_PROCESS_ID) give a
  plain multi-process launch; otherwise `auto` (default: SLURM with several tasks, or a TPU
  slice with several workers) lets jax detect the cluster. A single process does nothing.
  """
  env = os.environ
  coordinator_address = coordinator_address or env.get('MIM_COORDINATOR_ADDRESS')
  if num_processes is None and 'MIM_NUM_PROCESSES' in env:
    num_processes = int(env['MIM_NUM_PROCESSES'])
  if process_id is None and 'MIM_PROCESS_ID' in env:
    process_id = int(env['MIM_PROCESS_ID'])
  if coordinator_address:
    if num_processes is None or process_id is None:
      raise ValueError('A coordinator address needs --num_processes and --process_id too.')
    jax.distributed.initialize(coordinator_address, num_processes, process_id,
                               initialization_timeout=int(env.get('MIM_INIT_TIMEOUT_S', 300)))
    return
  if auto is None:
    auto = (int(env.get('SLURM_NTASKS', '1')) > 1
            or ',' in env.get('TPU_WORKER_HOSTNAMES', ''))
  if auto:
    jax.distributed.initialize()


def mesh_shape(mesh_cfg, device_count: int) -> tuple[int, int, int]:
  sizes = [mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor]
  if -1 in sizes:
    known = math.prod(s for s in sizes if s != -1)
    if device_count % known:
      raise ValueError(f'mesh (data, fsdp, tensor)={tuple(sizes)}: the fixed sizes ({known}) do not '
                       f'divide the {device_count} devices.')
    sizes[sizes.index(-1)] = device_count // known
  if math.prod(sizes) != device_count:
    raise ValueError(f'mesh (data, fsdp, tensor)={tuple(sizes)} needs {math.prod(sizes)} devices, '
                     f'but {device_count} are available; set one size to -1 to fill.')
  return tuple(sizes)


def make_mesh(mesh_cfg, devices=None) -> Mesh:
  """Auto axis types, so linen partitioning and sharding constraints work (jax-stack.md §4)."""
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(mesh_cfg, len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


@contextlib.contextmanager
def use_mesh(mesh: Mesh):
  """Makes `mesh` and the logical rules current: needed while tracing sharded model code."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
    yield


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(('data', 'fsdp')))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def logical_to_shardings(mesh: Mesh, boxed_abstract_tree):
  """NamedShardings for a tree whose leaves may carry LogicallyPartitioned boxes."""
  specs = nn.get_partition_spec(boxed_abstract_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, LOGICAL_RULES)


def strip_boxes(tree):
  """Drops the partitioning metadata boxes without applying sharding constraints."""
  is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)
  return jax.tree.map(lambda x: x.unbox(apply_constraint=False) if is_box(x) else x, tree,
                      is_leaf=is_box)


def global_batch(local_batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
  """Assembles each process's slice into global arrays sharded over the batch axes."""
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}
