"""Online probes during pretraining: kNN and a closed-form linear probe of the encoder on fixed
held-out subsets, every `eval.every_steps` steps and at the last step (also with `eval.knn`).

Subsets (mim/evaluate/run.py `subsets`, chosen once per run): the bank / linear train set is a
seeded class-balanced subset of `eval.knn_max_train` records of the train split, the queries /
test set `eval.knn_max_test` records of the eval split. Each probe streams both once through the
encoder (all patches, no masking; one compilation for the whole run, the pools of both probes
from the same pass), then on the host:
  knn      DINO votes, k = eval.knn_k, on eval.knn_pool ('both' reads cls), mim/evaluate/knn.py;
  linear   closed-form ridge (RidgeClassifier, alpha = eval.ridge_alpha) on standardized
           probe.linear_pool features, mim/evaluate/ridge.py: no probe training to tune or wait on.
The last step's probe also scores a randomly initialized encoder (`knn_random_init`,
`linear_random_init`): the baseline. Results go to metrics.jsonl / TensorBoard (a row at the
probe's step: knn, linear, probe_seconds) and a printed line. The loop restarts its throughput
timer after a probe, so img/s, GFLOP/s and MFU never include probe time.
"""
import time

import jax
import ml_collections
from jax.sharding import Mesh

from data import eval_subset
from mim import config as config_lib
from mim.evaluate import features as features_lib
from mim.evaluate import knn as knn_lib
from mim.evaluate import ridge
from mim.evaluate import run as eval_run
from mim.models import mae


class OnlineProbe:
  """`probe.due(step)`, then `probe(params, step, writer) -> metrics` (written and printed)."""

  def __init__(self, cfg: ml_collections.ConfigDict, model: mae.MAE, mesh: Mesh,
               total_steps: int):
    e = cfg.eval
    self.cfg, self.model, self.mesh, self.total_steps = cfg, model, mesh, total_steps
    self.at_end = bool(e.knn or e.every_steps)
    self.knn_pool = 'cls' if e.knn_pool == 'both' else e.knn_pool
    self.pools = tuple(dict.fromkeys((self.knn_pool, cfg.probe.linear_pool)))
    self.is_main = jax.process_index() == 0
    self._subsets: tuple[eval_subset.Subset, eval_subset.Subset] | None = None
    if self.at_end:  # fail now, not after the whole run
      config_lib.check_batch_divides(e.batch_size, mesh.size, jax.process_count())

  def due(self, step: int) -> bool:
    every = self.cfg.eval.every_steps
    return self.at_end if step == self.total_steps else bool(every and step % every == 0)

  def subsets(self) -> tuple[eval_subset.Subset, eval_subset.Subset]:
    if self._subsets is None:  # reads labels: only for runs that probe
      e = self.cfg.eval
      self._subsets = eval_run.subsets(self.cfg, e.knn_max_train, e.knn_max_test)
    return self._subsets

  def scores(self, encoder_params) -> dict[str, float]:
    """{'knn', 'linear'} accuracies of the encoder on the fixed subsets."""
    cfg, e = self.cfg, self.cfg.eval
    bank, queries = self.subsets()
    kwargs = dict(model=self.model, params={'encoder': encoder_params}, mesh=self.mesh,
                  pools=self.pools, batch_size=e.batch_size)
    fb = features_lib.extract(cfg.data, cfg.data.train_split, bank.indices,
                              what='online probe: bank', **kwargs)
    fq = features_lib.extract(cfg.data, cfg.data.eval_split, queries.indices,
                              what='online probe: queries', **kwargs)
    kp, lp = self.knn_pool, cfg.probe.linear_pool
    return dict(
        knn=knn_lib.knn_accuracy(fb[kp], fb['label'], fq[kp], fq['label'], k=e.knn_k,
                                 temperature=e.knn_temperature, num_classes=bank.num_classes),
        linear=ridge.ridge_accuracy(fb[lp], fb['label'], fq[lp], fq['label'],
                                    alpha=e.ridge_alpha, num_classes=bank.num_classes))

  def __call__(self, params, step: int, writer) -> dict[str, float]:
    """Probes `params['encoder']` (and at the last step a random init); writes and prints."""
    t0 = time.perf_counter()
    result = self.scores(params['encoder'])
    final = step == self.total_steps
    if final:
      rng = jax.random.key(self.cfg.seed + 12345)
      random_init = eval_run.jitted_random_encoder(self.model.spec, self.mesh)(rng)
      result.update({f'{k}_random_init': v for k, v in self.scores(random_init).items()})
    result['probe_seconds'] = time.perf_counter() - t0
    writer.write(step, result)
    if self.is_main:
      print(self.describe(step, result), flush=True)
    return result

  def describe(self, step: int, r: dict[str, float]) -> str:
    pct = lambda k: f'{100 * r[k]:.2f}%'
    what = f'k={self.cfg.eval.knn_k}, {self.knn_pool} features'
    ridge_what = f'ridge on {self.cfg.probe.linear_pool}'
    cost = f'{r["probe_seconds"]:.1f} s, not counted in img/s'
    if 'knn_random_init' not in r:
      return (f'probe at step {step}/{self.total_steps} | knn {pct("knn")} ({what}) | linear '
              f'{pct("linear")} ({ridge_what}) | {cost}')
    bank, queries = self.subsets()
    return (f'kNN accuracy ({what}; bank: {bank.description}; queries: {queries.description}): '
            f'pretrained {pct("knn")} vs random init {pct("knn_random_init")}; linear probe '
            f'({ridge_what}, same sets): {pct("linear")} vs {pct("linear_random_init")} | {cost}')
