"""mim.checkpoint's save settings: replicated arrays are cut into per-replica slices only where a
slice holds MIN_REPLICA_SLICE_BYTES or more (restore and resume are tested with the runs)."""
import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec as P
from orbax.checkpoint._src.serialization import replica_slices

from mim import checkpoint as ckpt_lib


def test_replicated_arrays_are_cut_per_replica_only_from_1_mib_a_slice(tmp_path, monkeypatch):
  cut = []   # the arrays Orbax slices on device, once per replica
  whole_or_slice = replica_slices.ReplicaSlice.data
  def data(self):
    if self.slice_args is not None:
      cut.append(self.unsliced_data.shape)
    return whole_or_slice(self)
  monkeypatch.setattr(replica_slices.ReplicaSlice, 'data', data)
  replicated = NamedSharding(jax.make_mesh((8,), ('d',)), P())
  rng = np.random.default_rng(0)
  tree = {'small': rng.normal(size=(1024, 255)).astype(np.float32),   # 8 slices of 127.5 KiB
          'large': rng.normal(size=(1024, 2048)).astype(np.float32)}  # 8 slices of 1 MiB
  assert tree['large'].nbytes // 8 == ckpt_lib.MIN_REPLICA_SLICE_BYTES
  mngr = ckpt_lib.manager(str(tmp_path))
  mngr.save(0, args=ocp.args.Composite(state=ocp.args.StandardSave(
      jax.device_put(tree, replicated))))
  mngr.wait_until_finished()
  assert cut == [(1024, 2048)] * 8, cut
  restored = mngr.restore(0, args=ocp.args.Composite(state=ocp.args.StandardRestore(
      jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                   tree))))['state']
  for name, value in tree.items():
    np.testing.assert_array_equal(np.asarray(restored[name]), value, err_msg=name)
