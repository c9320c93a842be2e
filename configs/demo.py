"""A small MAE on scikit-learn's digits (embedded, no download): a few minutes on 2 CPU cores.

Command:
  python main.py --config=configs/demo.py --workdir=/tmp/mim_demo
  python main.py --config=configs/demo.py:method=mae --workdir=W   # pick the method by name
  methods: mae (random masking), colormae (green noise), colormae_red|colormae_blue|colormae_purple,
  blockmask (BEiT blocks), radial (sectors); see docs/masking.md;
  with an EMA teacher: hpm (hard patches mining), data2vec (EMA feature targets + pixels),
  attmask (masks what the teacher attends to); see docs/methods.md;
  distilled from a frozen teacher (the demo's own MAE run in workdirs/demo, trained first):
  mrmae, dmae, maskalign, dtm; see docs/distillation.md.
Data: the 1797 8x8 digits shipped in scikit-learn (1437 train / 360 held out), upscaled to 32x32.
Model: ViT 128 wide x 6 blocks (4 heads), patch 8 (16 patches, 4 visible), decoder 64x2.
  Few, large patches make the 75% masking task need the digit's shape, not local interpolation.
Cost: 1.3M trainable parameters, 0.05 GFLOP per image per step; 600 steps of batch 128
  (53 epochs) train in 1.5 minutes on 2 CPU cores (2 minutes with the install, fresh clone).
Masking on the 4x4 grid (12 masked, 4 visible), scaled down from the 14x14 defaults: noise
  sigmas 1.0 / 0.5 patches (red blobs, green pairs, blue scattered singles), blocks of at least
  4 patches (2x2 up to 3x3: strictly inside the grid, so 9 at most), 6 radial sectors.
Expected (measured 2026-12-02, deterministic): loss 0.87 at step 50 -> 0.59 at step 600; kNN
  accuracy (k=20, cls token) on the 360 held-out digits 78.1% for the pretrained encoder vs 54.2%
  for a randomly initialized one.
"""
from mim import config as config_lib

# method -> (masking.name, masking.colored_noise.color)
MASKING = {'mae': ('random', ''), 'colormae': ('colored_noise', 'green'),
           'colormae_red': ('colored_noise', 'red'), 'colormae_blue': ('colored_noise', 'blue'),
           'colormae_purple': ('colored_noise', 'purple'), 'blockmask': ('block', ''),
           'radial': ('radial', ''), 'hpm': ('hard_patches', ''), 'data2vec': ('random', ''),
           'attmask': ('attention', ''), 'mrmae': ('random', ''), 'dmae': ('random', ''),
           'maskalign': ('random', ''), 'dtm': ('block', '')}
METHODS = tuple(MASKING)


def get_config(arg=None):
  method = (arg or 'method=mae').split('=', 1)[-1]
  if method not in METHODS:
    raise ValueError(f'configs/demo.py: method={method!r} is unknown; choose one of {METHODS}.')
  c = config_lib.default_config()
  c.batch_size = 128
  c.total_steps = 600
  c.log_every_steps = 50
  c.checkpoint_every_steps = 200
  c.reconstruction_every_steps = 200
  c.optim.base_lr = 1.5e-3
  c.optim.warmup_steps = 50
  c.model.update(dict(variant='', image_size=32, patch_size=8, width=128, depth=6, num_heads=4,
                      decoder_width=64, decoder_depth=2, decoder_heads=4))
  c.data.update(dict(name='digits', train_split='train', eval_split='test', num_workers=0,
                     crop_scale=(0.5, 1.0), flip=False))  # flipping changes a digit's meaning
  c.mesh.update(dict(data=-1, fsdp=1))
  # Its step's buffers are small (89 MiB): on glibc (no mimalloc) one malloc arena costs more
  # than re-faulting them (0.086 -> 0.092-0.104 s/step, bench/train_step.py --model=demo --batch=128).
  c.keep_freed_host_memory = False
  c.masking.name, color = MASKING[method]
  c.masking.colored_noise.update(dict(color=color or 'green', sigma_low=1.0, sigma_high=0.5))
  c.masking.block.min_patches = 4
  c.masking.radial.num_sectors = 6
  # Teacher-driven methods: a faster EMA than the ImageNet recipes' (600 steps, not 100 epochs).
  c.teacher.update(dict(momentum=((0.0, 0.99), (300.0, 0.999)), momentum_unit='steps'))
  config_lib.add_method_heads(c, method, feature_top_k=3)
  if method in config_lib.DISTILL_METHODS:
    # The demo's own MAE run (the first command above, 600 steps) as the frozen teacher.
    c.teacher.update(dict(weights='workdirs/demo', model=dict(
        variant='', image_size=32, patch_size=8, width=128, depth=6, num_heads=4)))
    config_lib.add_distillation(c, method)
    if method == 'dtm':  # DTM's BEiT block masking (40%) and ToMe schedule on 16 patches
      c.masking.ratio = 0.4
      c.distill.morph_max_steps = 4
  c.eval.knn = True
  return c
