"""`main.py --mode=eval`: a frozen encoder evaluated with the protocols of `config.eval.protocols`.

  python main.py --mode=eval --config=configs/linprobe_vitb.py --config.init_from=W_OR_WEIGHTS \
    --workdir=W2

The encoder comes from `init_from` (anything `mim.interop.load` reads: a workdir's latest
checkpoint, official MAE / timm / Hugging Face files; 'random' = a fresh init of config.model),
else from the workdir's own latest checkpoint; its architecture comes with the weights. Results go
to `<workdir>/eval/<protocol>.json` with one printed line per result. Everything is deterministic:
no masking, seeded class-balanced subsets, seeded probe training; the encoder and the batches are
sharded over config.mesh as in training.
"""
import functools
import json
import os
import time

import flax.linen as nn
import jax
import ml_collections
from jax.sharding import Mesh

from data import eval_subset
from mim import config as config_lib
from mim import paths
from mim import sharding
from mim.evaluate import features as features_lib
from mim.evaluate import heads
from mim.evaluate import knn as knn_lib
from mim.evaluate import probe
from mim.models import mae


def _init_encoder(spec: mae.ModelSpec, rng: jax.Array):
  """{'params': {'encoder': ...}} (boxed), without the decoder."""
  return mae.MAE(spec).init(rng, mae.example_inputs(spec)[0], method=mae.MAE.encode)


def _encoder_shardings(spec: mae.ModelSpec, mesh: Mesh):
  boxed = jax.eval_shape(lambda rng: _init_encoder(spec, rng), jax.random.key(0))
  return sharding.logical_to_shardings(mesh, boxed['params']['encoder'])


@functools.lru_cache(maxsize=8)
def jitted_random_encoder(spec: mae.ModelSpec, mesh: Mesh):
  """rng -> a freshly initialized encoder, created sharded over `mesh`."""
  return jax.jit(lambda rng: nn.unbox(_init_encoder(spec, rng))['params']['encoder'],
                 out_shardings=_encoder_shardings(spec, mesh))


def load_encoder(cfg: ml_collections.ConfigDict, workdir: str | None, mesh: Mesh
                 ) -> tuple[mae.MAE, dict, str]:
  """(model, {'encoder': params sharded over `mesh`}, what the weights are) for config.init_from
  (or the workdir's latest checkpoint)."""
  from mim import interop  # pylint: disable=g-import-not-at-top  (torch only for .pth files)
  from mim.interop import ours  # pylint: disable=g-import-not-at-top
  source = cfg.init_from or (workdir if workdir and ours.find_step_dir(workdir) else '')
  if not source:
    raise config_lib.ConfigError(
        f'Nothing to evaluate: set --config.init_from (a workdir, a checkpoint or weights file, '
        f"or 'random'); the workdir {workdir!r} has no checkpoint.")
  with sharding.use_mesh(mesh):
    if source == 'random':
      spec = mae.spec_from_config(cfg.model)
      params = jitted_random_encoder(spec, mesh)(jax.random.key(cfg.seed))
      return mae.MAE(spec), {'encoder': params}, f'random init (seed {cfg.seed})'
    loaded_cfg, params = interop.load(source, cfg.model)
    spec = mae.spec_from_config(loaded_cfg.model)
    params = jax.device_put(params['encoder'], _encoder_shardings(spec, mesh))
  return mae.MAE(spec), {'encoder': params}, source


def knn(cfg, model: mae.MAE, params, mesh: Mesh, bank: eval_subset.Subset,
        queries: eval_subset.Subset) -> dict:
  """kNN accuracies {pool: {'k20': acc, ...}} of the encoder, bank and queries as given
  (records of cfg.data.train_split / eval_split), with the subsets' descriptions."""
  e = cfg.eval
  pools = features_lib.pool_names(e.knn_pool)
  ks = sorted({*e.knn_ks, e.knn_k})
  kwargs = dict(model=model, params=params, mesh=mesh, pools=pools, batch_size=e.batch_size)
  fb = features_lib.extract(cfg.data, cfg.data.train_split, bank.indices, what='kNN bank', **kwargs)
  fq = features_lib.extract(cfg.data, cfg.data.eval_split, queries.indices, what='kNN queries',
                            **kwargs)
  accuracy = {}
  for pool in pools:
    progress = features_lib.Progress(f'kNN {pool}', len(fq['label']), unit='queries')
    accs = knn_lib.knn_accuracies(fb[pool], fb['label'], fq[pool], fq['label'], ks=ks,
                                  temperature=e.knn_temperature, num_classes=bank.num_classes,
                                  progress=progress.update)
    accuracy[pool] = {f'k{k}': a for k, a in accs.items()}
  return dict(accuracy=accuracy, temperature=e.knn_temperature, headline_k=e.knn_k,
              bank=bank.description, queries=queries.description,
              num_bank=int(len(fb['label'])), num_queries=int(len(fq['label'])))


def subsets(cfg, max_train: int, max_test: int
            ) -> tuple[eval_subset.Subset, eval_subset.Subset]:
  """Seeded, class-balanced subsets of the train and eval splits (0 = the whole split)."""
  seed, num_classes = cfg.eval.subset_seed, cfg.probe.num_classes
  train = eval_subset.select(cfg.data, cfg.data.train_split, max_train, seed, num_classes)
  test = eval_subset.select(cfg.data, cfg.data.eval_split, max_test, seed, train.num_classes)
  return train, test


def run_protocol(cfg, protocol: str, model: mae.MAE, params, mesh: Mesh) -> dict:
  """One protocol's result dict (what <workdir>/eval/<protocol>.json holds)."""
  if protocol == 'knn':
    return knn(cfg, model, params, mesh, *subsets(cfg, cfg.eval.knn_max_train,
                                                     cfg.eval.knn_max_test))
  train_set, test_set = subsets(cfg, cfg.probe.max_train_examples, cfg.probe.max_test_examples)
  head, state, info = probe.train(cfg, protocol, model, params, mesh, train_set)
  result = probe.evaluate(cfg, protocol, head, state, model, params, mesh, test_set)
  return {**result, **info, 'test': test_set.description}


def summary_lines(protocol: str, result: dict) -> list[str]:
  """The printed lines of one protocol's result."""
  if protocol == 'knn':
    return [f'knn {pool} {k}: {100 * acc:.2f}% (T={result["temperature"]}; bank: {result["bank"]}; '
            f'queries: {result["queries"]})'
            for pool, accs in result['accuracy'].items() for k, acc in accs.items()]
  top5 = f', top-5 {100 * result["top5"]:.2f}%' if 'top5' in result else ''
  return [f'{protocol} probe: top-1 {100 * result["top1"]:.2f}%{top5} '
          f'({result["mode_description"]}; '
          f'{result["pool"]}; {result["epochs"]:g} epochs, {result["steps"]} steps of '
          f'{result["batch_size"]}; train: {result["train"]}; test: {result["test"]})']


def evaluate(cfg: ml_collections.ConfigDict, workdir: str, devices=None) -> dict[str, dict]:
  """Runs every protocol of cfg.eval.protocols; writes <workdir>/eval/<protocol>.json (process
  0) and returns {protocol: result}. `devices` (default all) make the mesh."""
  config_lib.validate(cfg)
  mesh = sharding.make_mesh(cfg.mesh, devices)
  config_lib.check_batch_divides(cfg.eval.batch_size, mesh.size, jax.process_count())
  model, params, weights = load_encoder(cfg, workdir, mesh)
  if 'attentive' in cfg.eval.protocols:
    problem = heads.check_attentive(model.spec.width, cfg.probe.num_queries,
                                    cfg.probe.value_divisor)
    if problem:
      raise config_lib.ConfigError(f'Attentive probe: {problem}.')
  is_main = jax.process_index() == 0
  out_dir = os.path.join(workdir, 'eval')
  if is_main:
    paths.makedirs(out_dir)
    print(f'Evaluating {weights} (ViT {model.spec.width}x{model.spec.depth}, patch '
          f'{model.spec.patch_size}, {model.spec.image_size} px) on {mesh.size} device(s), mesh '
          f'{dict(mesh.shape)}: {", ".join(cfg.eval.protocols)}.', flush=True)
  results = {}
  for protocol in cfg.eval.protocols:
    t0 = time.perf_counter()
    result = run_protocol(cfg, protocol, model, params, mesh)
    result = dict(protocol=protocol, weights=weights, data=cfg.data.name, **result,
                  seconds=round(time.perf_counter() - t0, 2))
    results[protocol] = result
    if is_main:
      paths.write_text(os.path.join(out_dir, f'{protocol}.json'), json.dumps(result, indent=2))
      for line in summary_lines(protocol, result):
        print(line, flush=True)
  return results
