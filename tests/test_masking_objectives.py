"""Masking counts and permutations; norm-pix loss against numpy."""
import jax
import jax.numpy as jnp
import numpy as np

from mim import masking
from mim import objectives


def test_num_keep_truncates_like_official():
  assert masking.num_keep(196, 0.75) == 49
  assert masking.num_keep(256, 0.75) == 64
  assert masking.num_keep(10, 0.33) == 6   # int(6.7)


def test_scores_to_mask_counts_and_inverse_permutation():
  scores = masking.random_scores(jax.random.key(0), masking.MaskContext(16, (14, 14), 49))
  m = masking.scores_to_mask(scores, 49)
  mask, ids_keep, ids_restore = map(np.asarray, (m.mask, m.ids_keep, m.ids_restore))
  np.testing.assert_array_equal(mask.sum(1), 147)
  ids_shuffle = np.argsort(np.asarray(scores), axis=1)
  np.testing.assert_array_equal(np.take_along_axis(ids_shuffle, ids_restore, 1),
                                np.tile(np.arange(196), (16, 1)))
  # Visible = the 49 smallest scores; mask is 0 exactly there.
  for b in range(16):
    assert set(ids_keep[b]) == set(np.argsort(np.asarray(scores[b]))[:49])
    np.testing.assert_array_equal(np.flatnonzero(mask[b] == 0), np.sort(ids_keep[b]))


def test_explicit_noise_pins_the_mask():
  noise = jnp.asarray(np.random.default_rng(0).random((2, 10)), jnp.float32)
  a, b = masking.scores_to_mask(noise, 3), masking.scores_to_mask(noise, 3)
  np.testing.assert_array_equal(a.mask, b.mask)
  np.testing.assert_array_equal(np.asarray(a.ids_keep), np.argsort(np.asarray(noise), 1)[:, :3])


def numpy_norm_pix_loss(pred, images, mask, p):
  b, h, w, c = images.shape
  x = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, -1, p * p * c)
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).sum(-1, keepdims=True) / (x.shape[-1] - 1)
  target = (x - mean) / np.sqrt(var + 1e-6)
  per_patch = ((pred - target) ** 2).mean(-1)
  return (per_patch * mask).sum() / mask.sum()


def test_norm_pix_loss_matches_numpy():
  rng = np.random.default_rng(0)
  images = rng.standard_normal((3, 16, 16, 3)).astype(np.float64)
  pred = rng.standard_normal((3, 16, 48)).astype(np.float64)
  mask = (rng.random((3, 16)) < 0.75).astype(np.float64)
  loss32, _ = objectives.pixel_reconstruction_loss(
      jnp.asarray(pred, jnp.float32), jnp.asarray(images, jnp.float32), jnp.asarray(mask, jnp.float32),
      patch_size=4, norm_pix=True)
  np.testing.assert_allclose(float(loss32), numpy_norm_pix_loss(pred, images, mask, 4), rtol=1e-5)


def test_plain_pixel_loss_only_counts_masked_patches():
  images = jnp.zeros((1, 8, 8, 3))
  pred = jnp.ones((1, 4, 48)).at[0, 0].set(10.0)   # patch 0 wrong by 10, others by 1
  mask = jnp.array([[0.0, 1.0, 1.0, 0.0]])
  loss, per_patch = objectives.pixel_reconstruction_loss(pred, images, mask, patch_size=4,
                                                         norm_pix=False)
  assert float(loss) == 1.0
  assert float(per_patch[0, 0]) == 100.0
