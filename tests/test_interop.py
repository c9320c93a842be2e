"""Weight interop (issue #5): exports load into timm / transformers / the official MAE layout and
give our numbers; imports invert exports bit for bit; bad files fail with clear errors.

The torch-side tests skip when torch, timm or transformers is missing (requirements-dev.txt
installs them).
"""
import argparse
import io
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mim import checkpoint as ckpt_lib
from mim import config as config_lib
from mim import interop
from mim import paths
from mim import train
from mim.interop import files
from mim.interop import hf
from mim.interop import torch_layout
from mim.models import mae
from tests import launch

os.environ['HF_HUB_OFFLINE'] = '1'  # nothing may download at test time
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-5


def tiny_config(norm_pix: bool = True):
  c = config_lib.default_config()
  c.model.update(dict(variant='', image_size=32, patch_size=4, width=64, depth=2, num_heads=4,
                      mlp_dim=128, decoder_width=32, decoder_depth=2, decoder_heads=2,
                      decoder_mlp_dim=64))
  c.targets.norm_pix = norm_pix
  return c


@pytest.fixture(scope='module')
def tiny():
  """(config, params): MAE-initialized, then every tensor perturbed (LayerNorms included), so a
  swapped or mis-transposed tensor changes the outputs."""
  cfg = tiny_config()
  spec = mae.spec_from_config(cfg.model)
  variables = mae.MAE(spec).init(jax.random.key(0), *mae.example_inputs(spec, keep=16))
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda x: (np.asarray(x) + rng.normal(0, 0.05, x.shape)).astype(np.float32),
                        nn.unbox(variables['params']))
  return cfg, params


def inputs(batch: int = 2, seed: int = 1):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(batch, 3, 32, 32)).astype(np.float32),
          rng.uniform(size=(batch, 64)).astype(np.float32))


def assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype == np.float32
    np.testing.assert_array_equal(x, y)


# --------------------------------------------------------------------------- layout (numpy only)

def official_vit_b_shapes():
  """interop.md §2.1: `mae_vit_base_patch16_dec512d8b`, 150 encoder + 104 decoder keys."""
  def block(w, m):
    return {'norm1.weight': (w,), 'norm1.bias': (w,), 'attn.qkv.weight': (3 * w, w),
            'attn.qkv.bias': (3 * w,), 'attn.proj.weight': (w, w), 'attn.proj.bias': (w,),
            'norm2.weight': (w,), 'norm2.bias': (w,), 'mlp.fc1.weight': (m, w),
            'mlp.fc1.bias': (m,), 'mlp.fc2.weight': (w, m), 'mlp.fc2.bias': (w,)}
  s = {'cls_token': (1, 1, 768), 'pos_embed': (1, 197, 768),
       'patch_embed.proj.weight': (768, 3, 16, 16), 'patch_embed.proj.bias': (768,),
       'norm.weight': (768,), 'norm.bias': (768,),
       'decoder_embed.weight': (512, 768), 'decoder_embed.bias': (512,), 'mask_token': (1, 1, 512),
       'decoder_pos_embed': (1, 197, 512), 'decoder_norm.weight': (512,),
       'decoder_norm.bias': (512,), 'decoder_pred.weight': (768, 512), 'decoder_pred.bias': (768,)}
  for i in range(12):
    s.update({f'blocks.{i}.{k}': v for k, v in block(768, 3072).items()})
  for j in range(8):
    s.update({f'decoder_blocks.{j}.{k}': v for k, v in block(512, 2048).items()})
  return s


def test_vit_b_official_keys_and_shapes():
  spec = mae.spec_from_config(config_lib.default_config().model)  # the default is ViT-B/16
  shapes = torch_layout.torch_shapes(spec)
  assert shapes == official_vit_b_shapes() and len(shapes) == 254
  trainable = sum(int(np.prod(s)) for k, s in shapes.items() if not k.endswith('pos_embed'))
  assert trainable == 111_655_680  # methods.md §9.10
  encoder = torch_layout.torch_shapes(spec, with_decoder=False)
  assert len(encoder) == 150
  assert not any(k.startswith('decoder') or k == 'mask_token' for k in encoder)


@pytest.mark.parametrize('fmt', ['timm', 'hf', 'mae'])
def test_export_import_export_is_identity(tiny, storage, fmt):
  cfg, params = tiny
  first = interop.save(cfg, params, fmt, f'{storage}/a')
  cfg2, params2 = interop.load(first[0] if fmt != 'hf' else f'{storage}/a', cfg.model)
  want = {'encoder': params['encoder']} if fmt == 'timm' else params
  assert_trees_equal(params2, want)
  fields = ['image_size', 'patch_size', 'width', 'depth', 'num_heads', 'mlp_dim']
  if fmt != 'timm':
    fields += ['decoder_width', 'decoder_depth', 'decoder_heads', 'decoder_mlp_dim']
  got, ref = mae.spec_from_config(cfg2.model), mae.spec_from_config(cfg.model)
  assert {f: getattr(got, f) for f in fields} == {f: getattr(ref, f) for f in fields}
  second = interop.save(cfg2, params2, fmt, f'{storage}/b')
  for a, b in zip(first, second):
    if a.endswith('.npz'):  # zip members carry timestamps: compare the arrays
      npz = lambda path: np.load(io.BytesIO(paths.read_bytes(path)))
      with npz(a) as x, npz(b) as y:
        assert sorted(x) == sorted(y) and all(np.array_equal(x[k], y[k]) for k in x)
    elif not a.endswith('.pth'):
      assert paths.read_bytes(a) == paths.read_bytes(b), a


def test_npz_import_equals_safetensors_import(tiny, tmp_path):
  cfg, params = tiny
  st, npz_path = interop.save(cfg, params, 'timm', str(tmp_path / 'enc.safetensors'))
  assert (st, npz_path) == (str(tmp_path / 'enc.safetensors'), str(tmp_path / 'enc.npz'))
  _, from_npz = interop.load(npz_path)  # head count from the kernel shapes, no hint needed
  assert_trees_equal(from_npz, {'encoder': params['encoder']})


def test_hf_config_json(tiny, tmp_path):
  cfg, params = tiny
  interop.save(cfg, params, 'hf', str(tmp_path / 'hf'))
  with open(tmp_path / 'hf' / 'config.json') as f:
    c = json.load(f)
  assert c['layer_norm_eps'] == 1e-6 and c['norm_pix_loss'] is True and c['mask_ratio'] == 0.75
  heads = (c['num_attention_heads'], c['decoder_num_attention_heads'])
  assert c['hidden_size'] == 64 and heads == (4, 2)


@pytest.fixture(scope='module')
def workdir(tiny, tmp_path_factory):
  """A workdir as training leaves it: config.json and an Orbax checkpoint with optimizer state."""
  import grain
  import optax
  cfg, params = tiny
  wd = str(tmp_path_factory.mktemp('run'))
  with open(os.path.join(wd, 'config.json'), 'w') as f:
    f.write(cfg.to_json_best_effort(indent=2))
  # Sharded over every device, as the trainer saves it; reading back must not depend on that.
  mesh = jax.make_mesh((jax.device_count(),), ('d',))
  put = lambda x: jax.device_put(x, jax.NamedSharding(
      mesh, jax.P('d') if x.ndim and x.shape[0] % jax.device_count() == 0 else jax.P()))
  sharded = jax.tree.map(put, params)
  state = train.TrainState(step=jnp.array(7), params=sharded,
                           opt_state=optax.adamw(1e-3).init(sharded),
                           skipped_examples=jnp.array(0), nonfinite_updates=jnp.array(0))
  mngr = ckpt_lib.manager(os.path.join(wd, 'checkpoints'), max_to_keep=2)
  ckpt_lib.save(mngr, 7, state, iter(grain.MapDataset.range(4).to_iter_dataset()), cfg.to_dict())
  mngr.wait_until_finished()
  mngr.close()
  return wd


def test_load_our_checkpoint(tiny, workdir):
  cfg, params = tiny
  for path in (workdir, os.path.join(workdir, 'checkpoints', '7')):
    cfg2, params2 = interop.load(path)
    assert_trees_equal(params2, params)
    assert cfg2.to_json() == cfg.to_json()


def test_cli_export_from_workdir(tiny, workdir, storage):
  """main.py --mode=export (no --config: the workdir's config.json) -> mae files equal to ours,
  from and to a local disk or gs://."""
  cfg, params = tiny
  workdir = launch.on_storage(workdir, storage, 'run')
  out = f'{storage}/mae_tiny'
  r = subprocess.run([sys.executable, 'main.py', '--mode=export', f'--workdir={workdir}',
                      '--export_format=mae', f'--export_path={out}'],
                     cwd=REPO, capture_output=True, text=True)
  assert r.returncode == 0, r.stderr
  assert f'{out}.safetensors' in r.stdout
  _, params2 = interop.load(f'{out}.safetensors', cfg.model)
  assert_trees_equal(params2, params)


def test_export_falls_back_to_init_from(tiny, tmp_path):
  cfg, params = tiny
  src = interop.save(cfg, params, 'mae', str(tmp_path / 'src'))[0]
  run_cfg = tiny_config()
  run_cfg.init_from = src
  out = interop.export(run_cfg, str(tmp_path / 'empty_workdir'), 'hf', str(tmp_path / 'hf'))
  assert_trees_equal(interop.load(os.path.dirname(out[0]))[1], params)


def test_training_path_does_not_import_torch(tiny, tmp_path):
  cfg, params = tiny
  path = interop.save(cfg, params, 'mae', str(tmp_path / 'm'))[0]
  code = ('import sys; from mim import interop, train; from mim import config as c; '
          'm = c.default_config().model; m.update(width=64, decoder_width=32, num_heads=4, '
          f'decoder_heads=2); interop.load({path!r}, m); assert "torch" not in sys.modules')
  r = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True)
  assert r.returncode == 0, r.stderr


def test_without_torch_mae_export_writes_safetensors_only(tiny, tmp_path, monkeypatch):
  cfg, params = tiny
  def no_torch():
    raise interop.InteropError('Reading or writing .pth files needs PyTorch.')
  monkeypatch.setattr(files, '_torch', no_torch)
  assert interop.save(cfg, params, 'mae', str(tmp_path / 'm')) == [str(tmp_path / 'm.safetensors')]
  (tmp_path / 'x.pth').write_bytes(b'')
  with pytest.raises(interop.InteropError, match='needs PyTorch'):
    interop.load(str(tmp_path / 'x.pth'))


# --------------------------------------------------------------------------- errors

def test_wrong_shape_names_tensor_and_shapes(tiny, tmp_path):
  cfg, params = tiny
  path = interop.save(cfg, params, 'mae', str(tmp_path / 'm'))[0]
  sd = files.read_safetensors(path)
  sd['blocks.1.mlp.fc1.weight'] = np.zeros((96, 64), np.float32)
  files.write_safetensors(path, sd)
  with pytest.raises(interop.InteropError,
                     match=r"'blocks\.1\.mlp\.fc1\.weight' has shape \(96, 64\).*\(128, 64\)"):
    interop.load(path, cfg.model)
  hf_dir = str(tmp_path / 'hf')
  interop.save(cfg, params, 'hf', hf_dir)
  weights = os.path.join(hf_dir, 'model.safetensors')
  sd = files.read_safetensors(weights)
  sd['decoder.decoder_layers.1.output.dense.weight'] = np.zeros((32, 60), np.float32)
  files.write_safetensors(weights, sd)
  with pytest.raises(interop.InteropError, match=r"'decoder\.decoder_layers\.1\.output\.dense\.weight'"
                                                  r".*\(32, 60\).*\(32, 64\)"):
    interop.load(hf_dir)


def test_foreign_files_are_rejected(tmp_path):
  txt = tmp_path / 'notes.txt'
  txt.write_text('hello')
  with pytest.raises(interop.InteropError, match='not a recognized weights format.*Supported:'):
    interop.load(str(txt))
  other = str(tmp_path / 'resnet.safetensors')
  files.write_safetensors(other, {'conv1.weight': np.zeros((8, 3, 7, 7), np.float32)})
  with pytest.raises(interop.InteropError, match='not a recognized weights format.*Supported:'):
    interop.load(other)
  with pytest.raises(interop.InteropError, match='not a recognized weights format'):
    interop.load(str(tmp_path))  # a directory with neither checkpoints nor model.safetensors


def test_unknown_heads_learned_posemb_and_misfit_are_explained(tiny, tmp_path):
  cfg, params = tiny
  path = interop.save(cfg, params, 'mae', str(tmp_path / 'm'))[0]
  with pytest.raises(interop.InteropError, match='attention heads.*model.num_heads'):
    interop.load(path)  # width 64 is not a standard width, and .safetensors stores no head count
  sd = files.read_safetensors(path)
  sd['pos_embed'] = sd['pos_embed'] + 0.1
  files.write_safetensors(path, sd)
  with pytest.raises(interop.InteropError, match="'pos_embed' is not the fixed MAE 2-D sin-cos"):
    interop.load(path, cfg.model)
  other = tiny_config()
  other.model.num_heads = 2  # the trainer's model vs loaded weights
  other_shapes = torch_layout.abstract_params(mae.spec_from_config(other.model))
  with pytest.raises(interop.InteropError, match=r"MultiHeadDotProductAttention_0/\w+/\w+' has "
                                                  r'shape \((64, )?4, 16\), but the model needs '
                                                  r'\((64, )?2, 32\)'):
    interop.check_compatible(params, other_shapes)
  enc = {'encoder': params['encoder']}
  interop.check_compatible(enc, params)  # encoder-only weights fit a full model
  with pytest.raises(interop.InteropError, match='needs the MAE decoder'):
    interop.save(cfg, enc, 'hf', str(tmp_path / 'hf'))


# --------------------------------------------------------------------------- PyTorch side

def _timm_tiny(timm):
  return timm.models.vision_transformer.VisionTransformer(
      img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=4, mlp_ratio=2.0,
      num_classes=0).eval()


def our_features(cfg, params, images_nchw):
  spec = mae.spec_from_config(cfg.model)
  x = jnp.transpose(jnp.asarray(images_nchw), (0, 2, 3, 1))
  return np.asarray(mae.MAE(spec).apply({'params': params}, x, method=mae.MAE.encode))


def test_timm_features_equal_ours(tiny, tmp_path):
  torch = pytest.importorskip('torch')
  timm = pytest.importorskip('timm')
  from safetensors.torch import load_file
  cfg, params = tiny
  st, npz_path = interop.save(cfg, params, 'timm', str(tmp_path / 'enc'))
  images, _ = inputs()
  want = our_features(cfg, params, images)
  model = _timm_tiny(timm)
  model.load_state_dict(load_file(st), strict=True)
  with torch.no_grad():
    got = model.forward_features(torch.from_numpy(images)).numpy()
  assert got.shape == want.shape == (2, 65, 64)
  np.testing.assert_allclose(got, want, rtol=0, atol=TOL)
  model = _timm_tiny(timm)
  model.load_pretrained(npz_path)  # timm's own big_vision .npz loader
  with torch.no_grad():
    got = model.forward_features(torch.from_numpy(images)).numpy()
  np.testing.assert_allclose(got, want, rtol=0, atol=TOL)


def test_timm_vit_b_accepts_encoder_export_keys():
  torch = pytest.importorskip('torch')
  timm = pytest.importorskip('timm')
  with torch.device('meta'):  # shapes only, no memory
    model = timm.create_model('vit_base_patch16_224', pretrained=False, num_classes=0)
  want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
  spec = mae.spec_from_config(config_lib.default_config().model)
  assert torch_layout.torch_shapes(spec, with_decoder=False) == want


@pytest.mark.parametrize('norm_pix', [True, False])
def test_hf_vitmae_equals_ours(tiny, tmp_path, norm_pix):
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  _, params = tiny
  cfg = tiny_config(norm_pix)
  out_dir = str(tmp_path / 'hf')
  interop.save(cfg, params, 'hf', out_dir)
  model, info = transformers.ViTMAEForPreTraining.from_pretrained(out_dir, output_loading_info=True)
  assert not any(info[k] for k in ('missing_keys', 'unexpected_keys', 'mismatched_keys')), info
  assert model.config.layer_norm_eps == 1e-6 and model.config.norm_pix_loss == norm_pix
  images, noise = inputs()
  with torch.no_grad():
    got = model.eval()(pixel_values=torch.from_numpy(images), noise=torch.from_numpy(noise))
  want = interop.mae_forward(cfg, params, images, noise)
  np.testing.assert_array_equal(got.mask.numpy(), want['mask'])
  np.testing.assert_array_equal(got.ids_restore.numpy(), want['ids_restore'])
  np.testing.assert_allclose(got.logits.numpy(), want['pred'], rtol=0, atol=TOL)
  np.testing.assert_allclose(got.loss.item(), want['loss'], rtol=0, atol=TOL)


def test_hf_save_pretrained_round_trip(tiny, tmp_path):
  """A directory written by transformers' own save_pretrained imports to the same params."""
  pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  cfg, params = tiny
  interop.save(cfg, params, 'hf', str(tmp_path / 'ours'))
  model = transformers.ViTMAEForPreTraining.from_pretrained(str(tmp_path / 'ours'))
  model.save_pretrained(str(tmp_path / 'theirs'))
  cfg2, params2 = interop.load(str(tmp_path / 'theirs'))
  assert_trees_equal(params2, params)
  assert cfg2.targets.norm_pix == cfg.targets.norm_pix
  # The module names of transformers 5.x (vit.layers.{i}.attention.q_proj, ...), no config.json.
  state_dict = str(tmp_path / 'state_dict.safetensors')
  files.write_safetensors(state_dict, {k: v.numpy() for k, v in model.state_dict().items()})
  assert_trees_equal(interop.load(state_dict, cfg.model)[1], params)


def test_official_mae_pth_loads_strict(tiny, tmp_path):
  """The .pth is {'model': state_dict} with the official names, and a module tree built like
  `models_mae.MaskedAutoencoderViT` (timm Blocks, interop.md §2.1) loads it with strict=True."""
  torch = pytest.importorskip('torch')
  pytest.importorskip('timm')
  from timm.layers import PatchEmbed
  from timm.models.vision_transformer import Block
  cfg, params = tiny
  written = interop.save(cfg, params, 'mae', str(tmp_path / 'mae'))
  assert written == [str(tmp_path / 'mae.safetensors'), str(tmp_path / 'mae.pth')]
  ckpt = torch.load(written[1], map_location='cpu', weights_only=True)
  assert list(ckpt) == ['model']
  st = files.read_safetensors(written[0])
  assert ckpt['model'].keys() == st.keys()
  assert all(np.array_equal(ckpt['model'][k].numpy(), st[k]) for k in st)

  s = mae.spec_from_config(cfg.model)
  model = torch.nn.Module()
  model.patch_embed = PatchEmbed(s.image_size, s.patch_size, 3, s.width)
  model.cls_token = torch.nn.Parameter(torch.zeros(1, 1, s.width))
  model.pos_embed = torch.nn.Parameter(torch.zeros(1, s.num_patches + 1, s.width),
                                       requires_grad=False)
  model.blocks = torch.nn.ModuleList(Block(s.width, s.num_heads, s.mlp_dim / s.width, qkv_bias=True)
                                     for _ in range(s.depth))
  model.norm = torch.nn.LayerNorm(s.width, eps=1e-6)
  model.decoder_embed = torch.nn.Linear(s.width, s.decoder_width)
  model.mask_token = torch.nn.Parameter(torch.zeros(1, 1, s.decoder_width))
  model.decoder_pos_embed = torch.nn.Parameter(torch.zeros(1, s.num_patches + 1, s.decoder_width),
                                               requires_grad=False)
  model.decoder_blocks = torch.nn.ModuleList(
      Block(s.decoder_width, s.decoder_heads, s.decoder_mlp_dim / s.decoder_width, qkv_bias=True)
      for _ in range(s.decoder_depth))
  model.decoder_norm = torch.nn.LayerNorm(s.decoder_width, eps=1e-6)
  model.decoder_pred = torch.nn.Linear(s.decoder_width, s.patch_dim)
  model.load_state_dict(ckpt['model'], strict=True)

  _, params2 = interop.load(written[1], cfg.model)
  assert_trees_equal(params2, params)
  # A training checkpoint of the official code (util/misc.py::save_model) imports too.
  training = str(tmp_path / 'checkpoint-799.pth')
  torch.save({'model': ckpt['model'], 'optimizer': {'state': {}, 'param_groups': []}, 'epoch': 799,
              'scaler': {'scale': 65536.0}, 'args': argparse.Namespace(mask_ratio=0.75)}, training)
  assert_trees_equal(interop.load(training, cfg.model)[1], params)


def test_hf_vit_b_names_map_to_official():
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  with torch.device('meta'):  # shapes only, no memory
    model = transformers.ViTMAEForPreTraining(transformers.ViTMAEConfig())
  sd = {k: np.broadcast_to(np.float32(0), v.shape) for k, v in model.state_dict().items()}
  official, _ = hf.from_hf(sd)
  assert {k: v.shape for k, v in official.items()} == official_vit_b_shapes()
