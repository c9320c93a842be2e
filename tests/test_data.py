"""Tests of the input pipeline (data/)."""
import io
import logging
import os
import pathlib
import pickle

import ml_collections
import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

import data
from data import sources


MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
REPO = pathlib.Path(__file__).resolve().parents[1]


def make_cfg(**kw) -> ml_collections.ConfigDict:
  cfg = dict(name='digits', data_dir='', train_split='train', eval_split='test',
             crop_scale=(0.2, 1.0), crop_ratio=(3 / 4, 4 / 3), flip=True, mean=MEAN, std=STD,
             num_workers=0, max_skipped_fraction=0.01)
  return ml_collections.ConfigDict({**cfg, **kw})


def train_iter(cfg, seed=0, **kw):
  return iter(data.build_train_dataset(cfg, seed=seed, **{'image_size': 16, 'batch_size': 8, **kw}))


def take(cfg, n, **kw):
  it = train_iter(cfg, **kw)
  batches = [next(it) for _ in range(n)]
  it.close()  # Stop background prefetching.
  return batches


def unnormalize(x):
  return x * np.array(STD, np.float32) + np.array(MEAN, np.float32)


def shared_datasets() -> pathlib.Path:
  root = pathlib.Path(os.environ.get('MIM_DATASETS', REPO.parent / 'shared' / 'datasets'))
  if not (root / 'cifar10' / 'tiny.npz').exists():
    pytest.skip(f'shared datasets not found at {root}/cifar10 (set MIM_DATASETS)')
  return root


# ----------------------------------------------------------------------------- training stream

def test_digits_batch_shapes_labels_and_normalization():
  cfg = make_cfg()
  assert data.check_source(cfg, 'train') == 1437 and data.check_source(cfg, 'test') == 360
  (b,) = take(cfg, 1, batch_size=64, image_size=24)
  assert b['image'].shape == (64, 24, 24, 3) and b['image'].dtype == np.float32
  assert b['label'].shape == b['skipped'].shape == (64,)
  assert b['label'].dtype == b['skipped'].dtype == np.int32
  assert 0 <= b['label'].min() and b['label'].max() <= 9 and len(set(b['label'])) >= 5
  assert not b['skipped'].any()
  raw = unnormalize(b['image'])
  assert raw.min() >= -1e-5 and raw.max() <= 1 + 1e-5
  assert raw.max() > 0.9  # Strokes are 16/16 = 255 in places.
  np.testing.assert_allclose(raw[..., 0], raw[..., 2], atol=1e-5)  # grey stays grey
  # The background (0) normalizes to -mean/std per channel.
  np.testing.assert_allclose(b['image'].min((0, 1, 2)), -np.array(MEAN) / STD, atol=1e-5)


def test_same_seed_same_batches_other_seed_differs():
  cfg = make_cfg()
  a = take(cfg, 3, seed=7)
  b = take(cfg, 3, seed=7)
  c = take(cfg, 3, seed=8)
  for x, y in zip(a, b):
    for k in ('image', 'label', 'skipped'):
      np.testing.assert_array_equal(x[k], y[k])
  assert not np.array_equal(a[0]['image'], c[0]['image'])


@pytest.mark.parametrize('num_workers', [0, 2])
def test_iterator_state_reproduces_continuation(num_workers):
  cfg = make_cfg(num_workers=num_workers)
  it = train_iter(cfg)
  next(it), next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(3)]
  it.close()
  it = train_iter(cfg)
  it.set_state(state)
  got = [next(it) for _ in range(3)]
  it.close()
  for x, y in zip(expected, got):
    np.testing.assert_array_equal(x['image'], y['image'])
    np.testing.assert_array_equal(x['label'], y['label'])
  if num_workers:  # Batches do not depend on the number of workers.
    in_process = take(make_cfg(), 5)
    np.testing.assert_array_equal(in_process[4]['image'], got[2]['image'])


def write_npz(path, n, h=12, w=10, grey=False, **extra):
  rng = np.random.default_rng(n)
  shape = (n, h, w) if grey else (n, h, w, 3)
  np.savez(path, images=rng.integers(0, 256, shape, np.uint8), labels=np.arange(n), **extra)


def test_process_shards_are_disjoint_and_cover_the_epoch(tmp_path):
  # labels == record index, so the labels of a batch name the records read.
  write_npz(tmp_path / 'train.npz', 41)
  cfg = make_cfg(name='npz', data_dir=str(tmp_path), train_split='train.npz')
  epochs = []
  for p in (0, 1):
    bs = take(cfg, 10, batch_size=4, process_index=p, process_count=2)  # 20 per epoch
    labels = np.concatenate([b['label'] for b in bs])
    epochs.append((labels[:20], labels[20:]))
  for e in (0, 1):
    p0, p1 = set(epochs[0][e]), set(epochs[1][e])
    assert len(p0) == len(p1) == 20 and not p0 & p1  # one of the 41 is left out per epoch
    assert (p0 | p1) <= set(range(41))
  assert not np.array_equal(epochs[0][0], epochs[0][1])  # reshuffled every epoch


def test_global_batch_is_the_same_for_any_process_count(tmp_path):
  """The processes' local batches, in process order, are exactly the one-process global batch."""
  write_npz(tmp_path / 'train.npz', 41)
  cfg = make_cfg(name='npz', data_dir=str(tmp_path), train_split='train.npz')
  single = take(cfg, 6, batch_size=8)
  for count in (2, 4):
    parts = [take(cfg, 6, batch_size=8 // count, process_index=p, process_count=count)
             for p in range(count)]
    for k in range(6):
      for key in ('image', 'label'):
        np.testing.assert_array_equal(np.concatenate([parts[p][k][key] for p in range(count)]),
                                      single[k][key])


def test_start_batch_skips_without_changing_the_stream():
  cfg = make_cfg()
  full = take(cfg, 5)
  later = take(cfg, 2, start_batch=3)
  for a, b in zip(full[3:], later):
    np.testing.assert_array_equal(a['image'], b['image'])


# ----------------------------------------------------------------------------- npz

def test_npz_multiple_files_greyscale_and_eval(tmp_path):
  write_npz(tmp_path / 'train_00.npz', 6)
  write_npz(tmp_path / 'train_01.npz', 5, grey=True)
  np.savez_compressed(tmp_path / 'test.npz', images=np.full((3, 20, 30, 3), 77, np.uint8),
                      labels=np.array([4, 5, 6]))
  cfg = make_cfg(name='npz', data_dir=str(tmp_path), train_split='train_*.npz',
                 eval_split='test.npz')
  assert data.check_source(cfg, 'train_*.npz') == 11
  src = sources.make_source(cfg, 'train_*.npz')
  assert src._arrays is None  # the check read headers only
  assert src[6]['image'].shape == (12, 10, 3) and src[6]['label'] == 0  # first of the 2nd file
  assert isinstance(src._arrays[1][0], np.memmap)  # np.savez files are memory-mapped
  assert pickle.loads(pickle.dumps(src))._arrays is None  # workers open the files themselves
  np.testing.assert_array_equal(src[6]['image'][..., 0], src[6]['image'][..., 2])
  (b,) = take(cfg, 1, batch_size=11)
  assert sorted(b['label']) == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5]
  x, y = data.load_eval_split(cfg, 'test.npz', image_size=16)
  assert x.shape == (3, 16, 16, 3) and y.tolist() == [4, 5, 6]
  np.testing.assert_allclose(unnormalize(x) * 255, 77, atol=1e-3)


def test_npz_shared_cifar10():
  root = shared_datasets() / 'cifar10'
  cfg = make_cfg(name='npz', data_dir=str(root / 'tiny.npz'))  # one file: train_*/test_* keys
  assert data.check_source(cfg, 'train') == 1000 and data.check_source(cfg, 'test') == 500
  x, y = data.load_eval_split(cfg, 'test', image_size=32, max_examples=200)
  assert x.shape == (200, 32, 32, 3) and np.bincount(y).tolist() == [20] * 10  # balanced prefix
  np.testing.assert_allclose(unnormalize(x).mean((0, 1, 2)) * 255, (125.3, 122.9, 113.9), atol=12)
  (b,) = take(cfg, 1, image_size=32)
  assert b['image'].shape == (8, 32, 32, 3)
  if (root / 'train_00.npz').exists():
    cfg = make_cfg(name='npz', data_dir=str(root))
    assert data.check_source(cfg, 'train_*.npz') == 20000


# ----------------------------------------------------------------------------- folder

def _save(img, fmt):
  buf = io.BytesIO()
  img.save(buf, fmt)
  return buf.getvalue()


def make_folder(root):
  """9 files in 2 classes; the 3 bad ones each sit right before a good one."""
  rgba = np.zeros((16, 20, 4), np.uint8)
  rgba[:, 10:] = (0, 0, 255, 255)  # left half transparent, right half opaque blue
  pal = Image.fromarray(np.repeat([[1] * 6 + [0] * 6], 12, axis=0).astype(np.uint8), 'P')
  pal.putpalette([0, 153, 255, 9, 9, 9])
  pal.info['transparency'] = 1  # palette index 1 (the left half) is transparent
  good_jpeg = _save(Image.fromarray(np.full((30, 40, 3), (10, 200, 30), np.uint8)), 'JPEG')
  files = {
      'a/00_l.png': _save(Image.new('L', (20, 16), 100), 'PNG'),
      'a/01_zero.jpg': b'',
      'a/02_rgba.png': _save(Image.fromarray(rgba, 'RGBA'), 'PNG'),
      'a/03_truncated.jpg': good_jpeg[:len(good_jpeg) // 2],
      'a/04_p.png': _save(pal, 'PNG'),
      'a/05_text.png': b'not an image at all\n',
      'b/00_cmyk.jpg': _save(Image.new('CMYK', (24, 24), (0, 255, 255, 0)), 'JPEG'),
      'b/01_i16.png': _save(Image.fromarray(np.full((10, 14), 200 * 257, np.uint16)), 'PNG'),
      'b/02_rgb.jpg': good_jpeg,
      'b/readme.txt': b'ignored: not an image extension',
  }
  for name, content in files.items():
    (root / name).parent.mkdir(parents=True, exist_ok=True)
    (root / name).write_bytes(content)


def test_folder_modes_and_bad_files(tmp_path, caplog):
  make_folder(tmp_path / 'train')
  cfg = make_cfg(name='folder', data_dir=str(tmp_path))
  assert data.check_source(cfg, 'train') == 9
  src = sources.make_source(cfg, 'train')
  with caplog.at_level(logging.WARNING):
    recs = [src[i] for i in range(9)]
  assert [int(r['skipped']) for r in recs] == [0, 1, 0, 1, 0, 1, 0, 0, 0]
  for bad in ('01_zero.jpg', '03_truncated.jpg', '05_text.png'):
    assert bad in caplog.text
  assert all(r['image'].dtype == np.uint8 and r['image'].shape[2] == 3 for r in recs)
  assert (recs[0]['image'] == 100).all()  # L
  assert recs[2]['image'][0, 0].tolist() == [255, 255, 255]  # transparent -> white
  assert recs[2]['image'][0, 15].tolist() == [0, 0, 255]
  assert recs[1]['image'].shape == recs[2]['image'].shape  # the stand-in is the next file
  assert recs[4]['image'][0, 0].tolist() == [255, 255, 255]  # P, transparent index
  assert recs[4]['image'][0, 9].tolist() == [0, 153, 255]
  np.testing.assert_allclose(recs[6]['image'][0, 0], (255, 0, 0), atol=8)  # CMYK JPEG
  assert (recs[7]['image'] == 200).all()  # 16-bit, scaled by 65535 / 255
  assert [int(r['label']) for r in recs] == [0, 0, 0, 0, 0, 1, 1, 1, 1]

  # One batch = one epoch through the whole train pipeline: each bad file is hit exactly once.
  (b,) = take(cfg, 1, batch_size=9)
  assert b['skipped'].sum() == 3 and sorted(b['label']) == [0] * 5 + [1] * 4

  # Eval drops unreadable records instead of duplicating their neighbours.
  x, y = data.load_eval_split(cfg, 'train', image_size=8)
  assert x.shape == (6, 8, 8, 3) and y.tolist() == [0, 0, 0, 1, 1, 1]


def test_folder_too_large_image_is_skipped(tmp_path):
  (tmp_path / 'c').mkdir()
  # 90M pixels > PIL's 89.5M default bound: a decompression-bomb-like file (11 kB as 1-bit PNG).
  Image.new('1', (10000, 9000)).save(tmp_path / 'c' / 'big.png')
  Image.new('RGB', (5, 5), (1, 2, 3)).save(tmp_path / 'c' / 'small.png')
  src = sources.make_source(make_cfg(name='folder', data_dir=str(tmp_path)), '')
  with pytest.warns(Image.DecompressionBombWarning):
    r = src[0]
  assert r['skipped'] == 1 and r['image'].shape == (5, 5, 3)


def test_all_bad_files_raise(tmp_path):
  (tmp_path / 'c').mkdir()
  for i in range(3):
    (tmp_path / 'c' / f'{i}.jpg').write_bytes(b'x')
  src = sources.make_source(make_cfg(name='folder', data_dir=str(tmp_path)), '')
  with pytest.raises(data.DataError, match='3 consecutive unreadable'):
    src[0]


# ----------------------------------------------------------------------------- TFDS

class MimTestImages(tfds.core.GeneratorBasedBuilder):
  """10 train / 4 test images of varying size (ArrayRecord, written without TensorFlow)."""
  VERSION = tfds.core.Version('1.0.0')
  # tfds looks for a checksums file beside the builder's module, which needs the uninstalled
  # importlib_resources when tests/ is a namespace package; this builder downloads nothing.
  code_path = None

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        'image': tfds.features.Image(shape=(None, None, 3)),
        'label': tfds.features.ClassLabel(num_classes=5)}))

  def _split_generators(self, dl_manager):
    return {'train': self._generate_examples(10), 'test': self._generate_examples(4)}

  def _generate_examples(self, n):
    for i in range(n):
      yield i, {'image': Image.new('RGB', (20 + i, 18), (i * 20, 0, 0)), 'label': i % 5}


def test_tfds_array_record(tmp_path):
  MimTestImages(data_dir=str(tmp_path), file_format='array_record').download_and_prepare()
  cfg = make_cfg(name='mim_test_images', data_dir=str(tmp_path))
  assert data.check_source(cfg, 'train') == 10 and data.check_source(cfg, 'test[:3]') == 3
  (b,) = take(cfg, 1, batch_size=10)
  assert sorted(b['label']) == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
  x, y = data.load_eval_split(cfg, 'test', image_size=16)
  assert x.shape == (4, 16, 16, 3) and sorted(y) == [0, 1, 2, 3]
  # Solid colour images: the red channel of each is its label * 20.
  np.testing.assert_allclose(unnormalize(x)[:, 8, 8, 0] * 255, y * 20, atol=1e-3)


# ----------------------------------------------------------------------------- errors

@pytest.mark.parametrize('cfg_kw,split,match', [
    (dict(name='npz', data_dir='/no/such/dir'), 'train_*.npz', r"'/no/such/dir'.*data_dir"),
    (dict(name='folder', data_dir='/no/such/dir'), 'train', r'/no/such/dir/train.*data_dir'),
    (dict(name='digits'), 'validation', r"'validation'.*eval_split"),
    (dict(name='imagenet2012', data_dir='gs://b/d'), 'train', r"'gs://b/d' is a URI.*gcsfuse"),
])
def test_check_source_missing(cfg_kw, split, match):
  with pytest.raises(data.DataError, match=match):
    data.check_source(make_cfg(**cfg_kw), split)


def test_check_source_bad_npz_and_empty_folder(tmp_path):
  np.savez(tmp_path / 'keys.npz', x=np.zeros((2, 4, 4, 3), np.uint8), labels=np.zeros(2))
  np.savez(tmp_path / 'dtype.npz', images=np.zeros((2, 4, 4, 3)), labels=np.zeros(2, int))
  np.savez(tmp_path / 'count.npz', images=np.zeros((2, 4, 4, 3), np.uint8), labels=np.zeros(3, int))
  cfg = make_cfg(name='npz', data_dir=str(tmp_path))
  for split, match in [('keys.npz', r"keys\.npz lacks .*\['images'\]"),
                       ('dtype.npz', r'dtype\.npz: `images` is float64'),
                       ('count.npz', r'count\.npz: `labels` .*\(3,\)'),
                       ('none_*.npz', r"matches the split pattern 'none_\*\.npz'")]:
    with pytest.raises(data.DataError, match=match):
      data.check_source(cfg, split)
  (tmp_path / 'empty' / 'cls').mkdir(parents=True)
  with pytest.raises(data.DataError, match=r'empty.* has no image files'):
    data.check_source(make_cfg(name='folder', data_dir=str(tmp_path)), 'empty')


def test_check_source_tfds_not_prepared(tmp_path):
  cfg = make_cfg(name='imagenet2012', data_dir=str(tmp_path))
  with pytest.raises(data.DataError, match=r'not prepared in .*tfds build imagenet2012'):
    data.check_source(cfg, 'train')
  assert not list(tmp_path.iterdir())  # and nothing was downloaded or created
  with pytest.raises(data.DataError, match=r"'no_such_dataset_xyz' \(config.data.name\)"):
    data.check_source(make_cfg(name='no_such_dataset_xyz', data_dir=str(tmp_path)), 'train')
  with pytest.raises(data.DataError, match=r'/missing.*config.data.data_dir'):
    data.check_source(make_cfg(name='imagenet2012', data_dir=str(tmp_path / 'missing')), 'train')


# ----------------------------------------------------------------------------- eval

def test_load_eval_split_digits_exact_and_deterministic():
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  cfg = make_cfg()
  x, y = data.load_eval_split(cfg, 'test', image_size=8)  # 8x8: no resize
  digits = datasets.load_digits()
  assert x.shape == (360, 8, 8, 3) and x.dtype == np.float32 and y.dtype == np.int32
  np.testing.assert_array_equal(y, digits.target[1437:])
  np.testing.assert_allclose(unnormalize(x)[..., 1], np.rint(digits.images[1437:] * 255 / 16) / 255,
                             atol=1e-6)
  x2, y2 = data.load_eval_split(cfg, 'test', image_size=32, max_examples=50)
  x3, _ = data.load_eval_split(cfg, 'test', image_size=32, max_examples=50)
  assert x2.shape == (50, 32, 32, 3) and (y2 == y[:50]).all()
  np.testing.assert_array_equal(x2, x3)


def test_eval_resize_center_crop():
  from data import transforms  # pylint: disable=g-import-not-at-top
  # 100x200: the eval crop is the central 87.5x87.5 (x in 56..144); white covers it and the
  # bicubic kernel's reach (~11 px at this scale), black is outside.
  img = np.zeros((100, 200, 3), np.uint8)
  img[:, 30:170] = 255
  assert (transforms.eval_resize(img, 16) == 255).all()
  assert (transforms.eval_resize(img.transpose(1, 0, 2), 16) == 255).all()
  small = img[::10, 16:184:21]  # 10x8, not bigger than 16: the whole image is resized, no crop
  expected = Image.fromarray(small).resize((16, 16), Image.Resampling.BICUBIC)
  np.testing.assert_array_equal(transforms.eval_resize(small, 16), np.asarray(expected))


def test_adjacent_bad_files_count_each_replaced_example_once(tmp_path):
  """Three unreadable files in a row: the stand-in search passes several of them, but each
  example position whose own record is bad counts once (3 in all, not 3 + 2 + 1)."""
  good = _save(Image.new('RGB', (8, 8), (5, 6, 7)), 'PNG')
  names = ['00_ok.png', '01_bad.png', '02_bad.png', '03_bad.png', '04_ok.png', '05_ok.png']
  for name in names:
    (tmp_path / 'train' / 'a').mkdir(parents=True, exist_ok=True)
    (tmp_path / 'train' / 'a' / name).write_bytes(good if 'ok' in name else b'broken')
  cfg = make_cfg(name='folder', data_dir=str(tmp_path))
  src = sources.make_source(cfg, 'train')
  assert [int(src[i]['skipped']) for i in range(6)] == [0, 1, 1, 1, 0, 0]
  (b,) = take(cfg, 1, batch_size=6)
  assert b['skipped'].sum() == 3
