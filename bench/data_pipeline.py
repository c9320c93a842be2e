"""Steady-state throughput of the training input pipeline (images/s) per number of grain workers.

  python bench/data_pipeline.py --source=folder --image_size=224 --num_workers=0,2 --batch=64 --json

`folder` first writes 256 synthetic ImageNet-sized JPEGs (500x375, smooth random content) to a
temporary directory; `tfds` writes the same images as a TFDS ArrayRecord dataset (JPEG-encoded,
as `tfds build imagenet2012` stores them); `npz` writes 4096 random 32x32 images; `digits` needs
nothing.
"""
import json
import os
import pathlib
import sys
import tempfile
import time

from absl import app
from absl import flags
import ml_collections
import numpy as np
from PIL import Image

# Run as a script from anywhere: make the repo's `data` package importable (workers inherit this).
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import data  # pylint: disable=g-import-not-at-top,wrong-import-position

flags.DEFINE_enum('source', 'folder', ['folder', 'tfds', 'digits', 'npz'], 'Which source to read.')
flags.DEFINE_integer('image_size', 224, 'Output image side.')
flags.DEFINE_list('num_workers', ['0', '2'], 'grain worker process counts to compare.')
flags.DEFINE_integer('batch', 64, 'Per-process batch size.')
flags.DEFINE_integer('batches', 20, 'Timed batches after the warmup.')
flags.DEFINE_bool('json', False, 'End with one JSON line of the results.')
FLAGS = flags.FLAGS

WARMUP_BATCHES = 2  # The first includes worker start-up, the second drains the first prefetch.


def photo_like(rng: np.random.Generator) -> Image.Image:
  """A low-frequency colour field plus mild noise: JPEG-compresses like a photo, unlike noise."""
  coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), np.uint8)).resize(
      (500, 375), Image.Resampling.BICUBIC)
  pixels = np.asarray(coarse, np.int16) + rng.integers(-12, 13, (375, 500, 3))
  return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def write_folder(root: pathlib.Path, n: int = 256, classes: int = 4) -> None:
  rng = np.random.default_rng(0)
  for i in range(n):
    path = root / f'class_{i % classes}' / f'{i:04d}.jpg'
    path.parent.mkdir(parents=True, exist_ok=True)
    photo_like(rng).save(path, quality=90)


def write_tfds(data_dir: pathlib.Path, n: int = 256, classes: int = 4) -> str:
  """Writes the folder's images as a TFDS ArrayRecord dataset; returns its name."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (slow import)

  class BenchImages(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version('1.0.0')
    code_path = None  # downloads nothing (no checksums file to look for)

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          'image': tfds.features.Image(shape=(None, None, 3), encoding_format='jpeg'),
          'label': tfds.features.ClassLabel(num_classes=classes)}))

    def _split_generators(self, dl_manager):
      return {'train': self._generate_examples()}

    def _generate_examples(self):
      rng = np.random.default_rng(0)
      for i in range(n):
        yield i, {'image': photo_like(rng), 'label': i % classes}

  BenchImages(data_dir=str(data_dir), file_format='array_record').download_and_prepare()
  return 'bench_images'


def make_cfg(tmp: pathlib.Path) -> ml_collections.ConfigDict:
  cfg = ml_collections.ConfigDict(dict(
      name=FLAGS.source, data_dir=str(tmp), train_split='train', eval_split='',
      crop_scale=(0.2, 1.0), crop_ratio=(3 / 4, 4 / 3), flip=True,
      mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), num_workers=0,
      max_skipped_fraction=0.01))
  if FLAGS.source == 'folder':
    write_folder(tmp / 'train')
  elif FLAGS.source == 'tfds':
    cfg.name = write_tfds(tmp)
  elif FLAGS.source == 'npz':
    rng = np.random.default_rng(0)
    np.savez(tmp / 'train.npz', images=rng.integers(0, 256, (4096, 32, 32, 3), np.uint8),
             labels=rng.integers(0, 10, 4096))
    cfg.train_split = 'train.npz'
  return cfg


def measure(cfg, num_workers: int) -> dict[str, float]:
  cfg.num_workers = num_workers
  it = iter(data.build_train_dataset(cfg, image_size=FLAGS.image_size, batch_size=FLAGS.batch,
                                     seed=0))
  t0 = time.perf_counter()
  for _ in range(WARMUP_BATCHES):
    next(it)
  t1 = time.perf_counter()
  for _ in range(FLAGS.batches):
    batch = next(it)
  t2 = time.perf_counter()
  assert batch['image'].shape == (FLAGS.batch, FLAGS.image_size, FLAGS.image_size, 3)
  it.close()
  return {'num_workers': num_workers, 'warmup_s': round(t1 - t0, 3),
          'images_per_s': round(FLAGS.batches * FLAGS.batch / (t2 - t1), 1),
          'ms_per_batch': round(1000 * (t2 - t1) / FLAGS.batches, 1)}


def main(argv):
  del argv
  with tempfile.TemporaryDirectory() as tmp:
    cfg = make_cfg(pathlib.Path(tmp))
    results = [measure(cfg, int(n)) for n in FLAGS.num_workers]
  cpus = len(os.sched_getaffinity(0))
  print(f'source={FLAGS.source} image_size={FLAGS.image_size} batch={FLAGS.batch} cpus={cpus}')
  print(f'{"workers":>8} {"warmup s":>9} {"ms/batch":>9} {"images/s":>9}')
  for r in results:
    print(f'{r["num_workers"]:>8} {r["warmup_s"]:>9.2f} {r["ms_per_batch"]:>9.1f} '
          f'{r["images_per_s"]:>9.1f}')
  if FLAGS.json:
    print(json.dumps({'source': FLAGS.source, 'image_size': FLAGS.image_size,
                      'batch': FLAGS.batch, 'cpus': cpus, 'results': results}))


if __name__ == '__main__':
  app.run(main)
