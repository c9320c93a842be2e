"""MAE model parity details (methods.md §9): sizes, sin-cos layout, init, patch order, forward."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mim import masking
from mim import patches
from mim.models import mae
from mim.models import vit

VITB = mae.ModelSpec(224, 16, 768, 12, 12, 3072, 512, 8, 16, 2048)
TINY = mae.ModelSpec(32, 4, 64, 2, 4, 128, 32, 1, 4, 64)


def abstract_params(spec, keep=16):
  inputs = (jax.ShapeDtypeStruct((1, spec.image_size, spec.image_size, 3), jnp.float32),
            jax.ShapeDtypeStruct((1, keep), jnp.int32),
            jax.ShapeDtypeStruct((1, spec.num_patches), jnp.int32))
  return nn.unbox(jax.eval_shape(mae.MAE(spec).init, jax.random.key(0), *inputs)['params'])


def count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def test_vitb_parameter_count_matches_official():
  params = abstract_params(VITB, 49)
  assert count(params) == 111_655_680
  assert count(params['encoder']) == 85_647_360
  assert count(params['decoder']) == 26_008_320
  block = params['encoder']['Transformer']['encoderblock_0']
  assert block['MultiHeadDotProductAttention_0']['query']['kernel'].shape == (768, 12, 64)
  assert params['encoder']['embedding']['kernel'].shape == (16, 16, 3, 768)


def test_vith_patch14_head():
  spec = mae.ModelSpec(224, 14, 1280, 32, 16, 5120, 512, 8, 16, 2048)
  params = abstract_params(spec, 64)
  assert params['decoder']['pred']['kernel'].shape == (512, 588)
  assert spec.num_patches == 256


def test_sincos_table_matches_direct_formula():
  width, g = 16, 3
  table = vit.sincos_table(width, (g, g))
  assert table.shape == (1 + g * g, width)
  np.testing.assert_array_equal(table[0], 0)
  quarter = width // 4
  for i in range(g):
    for j in range(g):
      expected = []
      for coord in (j, i):  # first half: column (w); second half: row (h)
        omega = [1 / 10000 ** (k / quarter) for k in range(quarter)]
        expected += [np.sin(coord * o) for o in omega] + [np.cos(coord * o) for o in omega]
      np.testing.assert_allclose(table[1 + i * g + j], expected, rtol=1e-6, atol=1e-7)


def test_patchify_order_and_round_trip():
  rng = np.random.default_rng(0)
  images = rng.standard_normal((2, 8, 12, 3)).astype(np.float32)
  p = patches.patchify(images, 4)
  assert p.shape == (2, 6, 48)
  # patch (i=1, j=2) is index 1*3+2; inside it, vector index (py*4+px)*3+c.
  np.testing.assert_array_equal(p[1, 5].reshape(4, 4, 3), images[1, 4:8, 8:12, :])
  np.testing.assert_array_equal(patches.unpatchify(p, 4, (2, 3)), images)
  np.testing.assert_array_equal(np.asarray(patches.patchify(jnp.asarray(images), 4)), p)


def init_params(spec, keep, seed=0):
  inputs = (jnp.zeros((1, spec.image_size, spec.image_size, 3)), jnp.zeros((1, keep), jnp.int32),
            jnp.tile(jnp.arange(spec.num_patches)[None], (1, 1)))
  return nn.unbox(mae.MAE(spec).init(jax.random.key(seed), *inputs)['params'])


def test_mae_initialization_bounds():
  spec = mae.ModelSpec(32, 4, 256, 1, 4, 1024, 128, 1, 4, 512)
  params = init_params(spec, 16)
  enc = params['encoder']
  attn = enc['Transformer']['encoderblock_0']['MultiHeadDotProductAttention_0']
  d = spec.width
  # q/k/v as slices of a fused xavier (3D, D) matrix: bound sqrt(6 / (D + 3D)) = sqrt(1.5 / D).
  q = np.asarray(attn['query']['kernel'])
  assert np.abs(q).max() <= np.sqrt(1.5 / d) + 1e-7
  assert np.abs(q).max() > 0.95 * np.sqrt(1.5 / d)
  np.testing.assert_allclose(q.std(), np.sqrt(1.5 / d) / np.sqrt(3), rtol=0.05)
  out = np.asarray(attn['out']['kernel'])
  np.testing.assert_allclose(out.std(), np.sqrt(6 / (2 * d)) / np.sqrt(3), rtol=0.05)
  # Patch embedding: xavier over the (p*p*3, D) view; bias keeps torch's U(+-1/sqrt(p*p*3)).
  kernel = np.asarray(enc['embedding']['kernel'])
  bound = np.sqrt(6 / (48 + d))
  assert bound * 0.95 < np.abs(kernel).max() <= bound
  bias = np.asarray(enc['embedding']['bias'])
  assert 0.8 / np.sqrt(48) < np.abs(bias).max() <= 1 / np.sqrt(48)
  np.testing.assert_allclose(np.asarray(enc['cls']).std(), 0.02, rtol=0.2)
  np.testing.assert_array_equal(attn['query']['bias'], 0)
  np.testing.assert_array_equal(enc['Transformer']['encoder_norm']['scale'], 1)


def test_forward_with_keep_all_equals_unmasked_encoder():
  params = init_params(TINY, 16)
  model = mae.MAE(TINY)
  images = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  scores = jax.random.uniform(jax.random.key(2), (2, TINY.num_patches))
  m = masking.scores_to_mask(scores, TINY.num_patches)
  tokens = model.apply({'params': params}, images, m.ids_keep, method=mae.MAE.encode)
  full = model.apply({'params': params}, images, method=mae.MAE.encode)
  # Same tokens up to the shuffle (attention is permutation-equivariant).
  np.testing.assert_allclose(np.asarray(tokens[:, 1:]),
                             np.take_along_axis(np.asarray(full[:, 1:]), np.asarray(m.ids_keep)[..., None], 1),
                             atol=1e-5)
  pred = model.apply({'params': params}, images, m.ids_keep, m.ids_restore)['pixels']
  assert pred.shape == (2, TINY.num_patches, TINY.patch_dim)


def test_decoder_sees_visible_tokens_in_patch_order():
  """Moving visible patch content changes predictions only through positions (unshuffle check)."""
  params = init_params(TINY, 16)
  model = mae.MAE(TINY)
  images = jax.random.normal(jax.random.key(1), (1, 32, 32, 3))
  scores = jax.random.uniform(jax.random.key(3), (1, TINY.num_patches))
  m = masking.scores_to_mask(scores, 16)
  pred = model.apply({'params': params}, images, m.ids_keep, m.ids_restore)['pixels']
  # The same visible set given in a different (sorted) order must give identical predictions.
  order = jnp.argsort(m.ids_keep, axis=1)
  ids_keep2 = jnp.take_along_axis(m.ids_keep, order, 1)
  shuffle2 = jnp.concatenate([ids_keep2, jnp.argsort(m.ids_restore, axis=1)[:, 16:]], axis=1)
  ids_restore2 = jnp.argsort(shuffle2, axis=1)
  pred2 = model.apply({'params': params}, images, ids_keep2, ids_restore2)['pixels']
  np.testing.assert_allclose(np.asarray(pred), np.asarray(pred2), atol=1e-5)


def test_gelu_is_exact():
  """Our erf GELU against scipy's erf (a tanh approximation is off by up to 5e-4) and its
  gradient against flax's exact GELU."""
  x = jnp.linspace(-6, 6, 49)
  from scipy.special import erf
  expected = 0.5 * np.asarray(x, np.float64) * (1 + erf(np.asarray(x, np.float64) / np.sqrt(2)))
  np.testing.assert_allclose(np.asarray(vit.gelu(x)), expected, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(np.asarray(jax.vmap(jax.grad(vit.gelu))(x)),
                             np.asarray(jax.vmap(jax.grad(lambda v: nn.gelu(v, approximate=False)))(x)),
                             atol=2e-6)


def test_attention_gradients_match_autodiff():
  """The custom-VJP attention against jax.nn.dot_product_attention (autodiff) in value and in
  all three input gradients; catches a wrong row-sum identity or a missing 1/sqrt(Dh)."""
  b, h, l, d = 2, 3, 7, 8
  q, k, v, g = (jax.random.normal(key, (b, h, l, d)) for key in jax.random.split(jax.random.key(0), 4))
  t = lambda x: x.transpose(0, 2, 1, 3)  # dot_product_attention takes (B, L, H, Dh)
  reference = lambda q, k, v: t(jax.nn.dot_product_attention(t(q), t(k), t(v)))
  np.testing.assert_allclose(vit.attention(q, k, v), reference(q, k, v), atol=1e-5)
  ours = jax.grad(lambda *a: jnp.sum(vit.attention(*a) * g), argnums=(0, 1, 2))(q, k, v)
  expected = jax.grad(lambda *a: jnp.sum(reference(*a) * g), argnums=(0, 1, 2))(q, k, v)
  for a, e in zip(ours, expected):
    np.testing.assert_allclose(a, e, atol=1e-5)
