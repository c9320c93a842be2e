"""The config schema: every key a recipe may set, with its default, and validation.

Recipes in configs/ start from `default_config()` and change values; `validate` rejects keys the
schema does not know (with near-match suggestions) and bad values, before anything compiles.
"""
import difflib
import ml_collections

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ConfigError(ValueError):
  """A config value is wrong; the message names the key and what to do."""


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.batch_size = 4096             # global, over all devices and processes
  c.grad_accum_steps = 1          # split each batch into this many sequential micro-batches (memory)
  c.total_epochs = 1600.0
  c.total_steps = 0               # > 0 overrides total_epochs
  c.log_every_steps = 50
  c.checkpoint_every_steps = 1000
  c.reconstruction_every_steps = 0   # 0 = only at the end
  c.max_to_keep = 3               # most recent checkpoints kept
  c.keep_every_steps = 0          # > 0: also keep every checkpoint at a multiple of this step
  c.nan_policy = 'stop'           # NaN/Inf loss or gradients: 'stop' (clear error) or 'skip' the update
  c.init_from = ''                # weights to start from when the workdir has no checkpoint
  c.init_from_state = False       # with init_from = one of our runs: its full state, not only params
  c.peak_tflops_per_device = 0.0  # for MFU; 0 = datasheet table (TPU/GPU), measured+cached (CPU)
  c.mimalloc = True                # CPU: restart on mimalloc where its wheel is installed, which
                                   # reuses XLA's per-step buffers (mim/host_memory.py: Ti/4 -15%)
  c.keep_freed_host_memory = True  # CPU on glibc: the same reuse with one malloc arena
                                   # (mim/host_memory.py: ViT-Ti/4 -10% s/step, tiny models slower)

  c.model = ml_collections.ConfigDict(dict(
      variant='B',                # ViT preset: Ti, S, B, L, H ('' = give width/depth/num_heads)
      image_size=224, patch_size=16,
      width=0, depth=0, num_heads=0, mlp_dim=0,   # 0 = from the variant (mlp 4x width)
      decoder_width=512, decoder_depth=8, decoder_heads=16, decoder_mlp_dim=0,
      remat=False,                # recompute block activations in the backward pass (memory)
      loss_predictor=False,       # HPM: a second decoder predicting each patch's loss
      feature_head=False,         # EMA feature targets: a head regressing features from the decoder
      decoder=True,               # False: no decoder and no pixel loss (MaskAlign: distill only)
      dtype='float32'))           # compute: 'float32' | 'bfloat16' (fp32 params, optimizer, loss)
                                  # | 'auto' (bfloat16 on GPU/TPU, float32 on CPU)

  from mim import masking  # local: the schema's masking sections come from the registry
  # name: the strategy (mim/masking.py); each strategy with parameters has its own section.
  c.masking = ml_collections.ConfigDict(dict(name='random', ratio=0.75,
                                             **masking.default_sections()))
  # The loss: a weighted sum of named terms (mim/objectives.py), each logged as <term>_loss.
  c.targets = ml_collections.ConfigDict(dict(
      name='pixels', norm_pix=True,
      pixel_weight=1.0,           # norm-pix MSE on masked patches
      loss_pred_weight=0.0,       # HPM's relative loss-prediction term (needs model.loss_predictor)
      feature_weight=0.0,         # EMA-teacher feature regression (needs model.feature_head)
      feature_ramp_epochs=0.0,    # > 0: feature weight * min((epoch + 1) / this, 1) (BootMAE)
      feature_top_k=6,            # data2vec targets: mean of the teacher's top-K blocks
      feature_loss='smooth_l1',   # 'smooth_l1' (data2vec, beta below) | 'mse'
      feature_beta=2.0,
      distill_weight=0.0))        # frozen-teacher distillation (the distill section)

  # The teacher (mim/teacher.py): 'ema', a copy of the student in the state when a masking
  # strategy or term needs it; or 'frozen', a pretrained ViT read from `weights` (any format
  # init_from reads), never updated, not checkpointed, for the distillation term below.
  c.teacher = ml_collections.ConfigDict(dict(
      kind='ema',                 # 'ema' | 'frozen'
      weights='',                 # frozen: a workdir, checkpoint, .safetensors, HF directory, .pth
      weights_sha256='',          # frozen: the weights' digest; '' = recorded at the start of a run
      blocks=0,                   # frozen: run only the first K blocks (DMAE); 0 = all
      resample=False,             # frozen: resize images to teacher.model.image_size and the
                                  # teacher's token grid to the student's when they differ
      # frozen: the teacher's ViT (any size, patch size and depth), as model.* ('' = explicit).
      model=ml_collections.ConfigDict(dict(variant='B', image_size=224, patch_size=16, width=0,
                                           depth=0, num_heads=0, mlp_dim=0)),
      momentum=((0.0, 0.999), (100.0, 0.9999)),  # (time, tau) points; constant after the last
      momentum_unit='epochs',     # the points' time: 'epochs' | 'steps'
      momentum_shape='linear',    # between points: 'linear' | 'cosine'
      momentum_per_epoch=False,   # hold tau within each epoch (the official per-epoch updates)
      dtype='float32'))           # the teacher pass: 'float32' | 'bfloat16' | 'auto'

  # Distillation from the frozen teacher (targets.distill_weight > 0; mim/objectives.distill_term,
  # docs/distillation.md):
  # student features (through a head) against teacher block outputs on the same tokens.
  c.distill = ml_collections.ConfigDict(dict(
      student='encoder',          # 'encoder': block outputs on the visible tokens (MR-MAE, DMAE,
                                  # MaskAlign) | 'decoder': the decoder's output tokens (DTM)
      student_layers=(-1,),       # encoder block indices (0-based, negative from the end)
      teacher_layers=(-1,),       # teacher block indices (0-based, negative from the end)
      tokens='visible',           # 'visible' (student='encoder') | 'all' | 'masked' (decoder)
      head='linear',              # per teacher layer: 'linear' | 'mlp' (Dense-GELU-Dense)
      head_hidden=0,              # mlp hidden width; 0 = the teacher's width
      align='direct',             # 'direct': i-th student layer -> i-th teacher layer (or one
                                  # student layer -> every teacher layer) | 'dynamic': MaskAlign's
                                  # learnable weights mixing all student layers per teacher layer
      final_norm=True,            # a model's last block is taken after its final LayerNorm
                                  # (the encoder's output; MR-MAE, DTM); False: raw (MaskAlign)
      normalize='target_layer_norm',  # before the loss: the teacher's features LayerNorm'd (no
                                  # affine; MR-MAE, MaskAlign) | 'l2': both sides unit-length per
                                  # token (DMAE) | 'none' (DTM)
      loss='smooth_l1',           # 'smooth_l1' (beta) | 'mse' | 'l1' | 'cosine' (1 - cos)
      beta=2.0,
      morph=False,                # DTM: aggregate both sides with the teacher's ToMe groups
      morph_branches=2,           # independent morphing schedules, losses averaged
      morph_max_tokens=0,         # tokens merged n ~ U{0..this}; 0 = all patches
      morph_max_steps=14,         # steps k ~ U{1..this}
      morph_per_sample=True))     # a schedule per sample (the paper); False: one per batch (code)

  c.optim = ml_collections.ConfigDict(dict(
      base_lr=1.5e-4,             # lr = base_lr * batch_size / 256
      min_lr=0.0,
      warmup_epochs=40.0,
      warmup_steps=-1,            # >= 0 overrides warmup_epochs
      b1=0.9, b2=0.95, eps=1e-8,
      weight_decay=0.05,
      # Decayed parameters, by path regex. The official MAE decays every tensor with ndim >= 2
      # that is not a bias, which includes the cls and mask tokens.
      weight_decay_regex=r'.*/(kernel|cls|mask_token)$',
      grad_clip_norm=0.0))        # 0 = off (official recipe)

  c.data = ml_collections.ConfigDict(dict(
      name='imagenet2012', data_dir='', train_split='train', eval_split='validation',
      crop_scale=(0.2, 1.0), crop_ratio=(3 / 4, 4 / 3), flip=True,
      mean=IMAGENET_MEAN, std=IMAGENET_STD,
      num_workers=8, max_skipped_fraction=0.001))

  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))  # -1 = fill

  c.eval = ml_collections.ConfigDict(dict(
      knn=False,                  # at the end: kNN accuracy, pretrained vs random-init encoder
      every_steps=0,              # > 0: online probes (kNN + ridge) every this many steps and at
                                  # the end (mim/evaluate/online.py); 0 = off (eval.knn: end only)
      ridge_alpha=1.0,            # online linear probe: closed-form ridge on standardized features
      knn_k=20, knn_max_train=10000, knn_max_test=10000,  # bank / queries; 0 = the whole split
      num_reconstructions=8,
      protocols=('knn',),         # --mode=eval runs these: any of 'knn', 'linear', 'attentive'
      knn_ks=(10, 20, 200),       # --mode=eval reports each of these k (and knn_k)
      knn_temperature=0.07,       # DINO protocol: votes exp(cosine / T)
      knn_pool='cls',             # cls | avg | both | cls_prenorm | avg_prenorm (mim/evaluate/features.py)
      subset_seed=0,              # of the class-balanced subsets (knn_max_*, probe.max_*_examples)
      batch_size=256))            # global batch of feature extraction (padded: one compilation)

  # --mode=visualize (mim/evaluate/mask_views.py; reconstructions with init_from: recon_views.py).
  c.visualize = ml_collections.ConfigDict(dict(
      images='',                  # a directory or glob of image files; '' = data.eval_split
      num_images=8))              # the first this many images (sorted file names)

  # Probes on the frozen encoder (mim/evaluate/probe.py), MAE linear-probe recipe (methods.md §1.9).
  c.probe = ml_collections.ConfigDict(dict(
      mode='augment',             # 'augment': encoder on RandomResizedCrop + flip views every step
                                  # (the protocol); 'cached': center-crop features once (fast)
      epochs=90.0, warmup_epochs=10.0,
      batch_size=16384,           # global
      base_lr=0.1, min_lr=0.0,    # lr = base_lr * batch_size / 256, warmup then cosine
      momentum=0.9, trust_coefficient=0.001, weight_decay=0.0,   # LARS
      crop_scale=(0.08, 1.0),     # RandomResizedCrop scale in 'augment' mode
      max_train_examples=0, max_test_examples=0,   # > 0: a class-balanced subset; 0 = all
      num_classes=0,              # 0 = from the data
      linear_pool='cls',          # linear probe input: cls (MAE protocol) | avg | *_prenorm
      num_queries=32, value_divisor=1,   # attentive probe: M queries, values D -> D / value_divisor
      attentive_use_cls=False,    # attentive probe: the cls token is a key too
      log_every_steps=100))

  # Fine-tuning (--mode=finetune, mim/finetune/train.py), MAE protocol (methods.md §1.8); the
  # optimizer, schedule, batch and crop come from the common keys (configs/finetune_vitb.py).
  c.finetune = ml_collections.ConfigDict(dict(
      num_classes=0,              # 0 = from the data
      layer_decay=0.65,           # lr x layer_decay ** (depth + 1 - layer id); 1.0 = off
      drop_path=0.1,              # stochastic depth of the last block, linear from 0 at the first
      head_init_std=2e-5,         # trunc-normal head kernel (MAE: essentially zero)
      mixup_alpha=0.8, cutmix_alpha=1.0,   # 0 and 0 = no mixing
      mix_switch_prob=0.5,        # with both alphas: probability of cutmix for a batch
      label_smoothing=0.1,
      rand_augment_ops=2, rand_augment_magnitude=9.0, rand_augment_std=0.5,  # ops 0 = off
      random_erasing=0.25,        # probability per image
      eval_every_epochs=0.0))     # top-1 on data.eval_split every this many epochs; 0 = at the end
  return c


def add_method_heads(c: ml_collections.ConfigDict, method: str, feature_top_k: int) -> None:
  """The model heads and loss terms a method adds to an MAE config: 'hpm' the loss predictor and
  its ranking loss, 'data2vec' a feature head regressing the EMA teacher's top-K block average
  (an MAE-style student that keeps its pixel loss, as BootMAE); other methods add nothing."""
  if method == 'hpm':
    c.model.loss_predictor = True
    c.targets.loss_pred_weight = 1.0
  if method == 'data2vec':
    c.model.feature_head = True
    c.targets.update(dict(feature_weight=1.0, feature_top_k=feature_top_k))


DISTILL_METHODS = ('mrmae', 'dmae', 'maskalign', 'dtm')


def add_distillation(c: ml_collections.ConfigDict, method: str) -> None:
  """A frozen-teacher method (docs/distillation.md) on a config whose model.* and teacher.model.*
  are set; layers scale with the depths as in the papers' ViT-B students:
  'mrmae' the encoder's output (visible tokens, linear head) mimics the teacher's LayerNorm'd
    output (MSE), beside the pixel loss;
  'dmae' block 3/4 of the student (linear head) against block 3/4 of the teacher, which runs
    only that far; L1 between unit-length features, beside the pixel loss (no norm-pix);
  'maskalign' no decoder and no pixel loss: every student block (raw) mixed by Dynamic Alignment
    into the teacher's last 5 blocks (LayerNorm'd), 2 x smooth-L1 (beta 1), mask ratio 0.7;
  'dtm' the decoder's output at every patch against the teacher's output, both replaced by the
    means of the teacher's ToMe groups (2 branches), smooth-L1 (beta 2), no pixel loss."""
  from mim import teacher as teacher_lib  # local, as in validate
  from mim.models import mae
  depth = mae.spec_from_config(c.model).depth
  teacher_depth = mae.spec_from_config(teacher_lib.teacher_model_config(c)).depth
  c.teacher.kind = 'frozen'
  c.targets.distill_weight = 1.0
  d = c.distill
  if method == 'mrmae':
    d.update(dict(student_layers=(-1,), teacher_layers=(-1,), loss='mse'))
  elif method == 'dmae':
    c.teacher.blocks = round(0.75 * teacher_depth)
    c.targets.norm_pix = False
    d.update(dict(student_layers=(round(0.75 * depth) - 1,), teacher_layers=(c.teacher.blocks - 1,),
                  normalize='l2', loss='l1'))
  elif method == 'maskalign':
    c.model.decoder = False
    c.masking.ratio = 0.7
    c.targets.pixel_weight = 0.0
    c.targets.distill_weight = 2.0
    d.update(dict(student_layers=tuple(range(depth)),
                  teacher_layers=tuple(range(max(teacher_depth - 5, 0), teacher_depth)),
                  align='dynamic', final_norm=False, loss='smooth_l1', beta=1.0))
  elif method == 'dtm':
    c.targets.pixel_weight = 0.0
    d.update(dict(student='decoder', tokens='all', morph=True, normalize='none', loss='smooth_l1',
                  beta=2.0))
  else:
    raise ValueError(f'Unknown distillation method {method!r}; choose one of {DISTILL_METHODS}.')


def load(path: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """`get_config(arg)` of a config file (what --config=path[:arg] gives, for scripts and tests)."""
  import importlib.util
  module_spec = importlib.util.spec_from_file_location('mim_config_file', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg)


def _suggest(key: str, known) -> str:
  close = difflib.get_close_matches(key, list(known), n=3, cutoff=0.6)
  return f' Did you mean {", ".join(map(repr, close))}?' if close else ''


def _check_keys(cfg: ml_collections.ConfigDict, schema: ml_collections.ConfigDict, prefix: str):
  for key in cfg.keys():
    path = f'{prefix}{key}'
    if key not in schema:
      raise ConfigError(f'Unknown config key {path!r}.{_suggest(key, schema.keys())} '
                        f'Known keys here: {", ".join(sorted(schema.keys()))}.')
    if isinstance(schema[key], ml_collections.ConfigDict):
      if not isinstance(cfg[key], ml_collections.ConfigDict):
        raise ConfigError(f'Config key {path!r} must be a section, got {cfg[key]!r}.')
      _check_keys(cfg[key], schema[key], path + '.')


def _require(ok: bool, msg: str):
  if not ok:
    raise ConfigError(msg)


def validate(cfg: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the key for anything wrong in `cfg`."""
  _check_keys(cfg, default_config(), '')
  _validate_vit(cfg.model, 'model')
  from mim.models import mae  # local: keeps this module importable without flax
  spec = mae.spec_from_config(cfg.model)
  _validate_width('model.decoder_', spec.decoder_width, 'model.decoder_heads', spec.decoder_heads)
  _require(0.0 < cfg.masking.ratio < 1.0,
           f'masking.ratio={cfg.masking.ratio} must be in (0, 1), e.g. 0.75.')
  from mim import masking
  _require(cfg.masking.name in masking.STRATEGIES,
           f'masking.name={cfg.masking.name!r} is unknown.{_suggest(cfg.masking.name, masking.STRATEGIES)} '
           f'Choose one of {sorted(masking.STRATEGIES)}.')
  keep = masking.num_keep(spec.num_patches, cfg.masking.ratio)
  _require(keep >= 1,
           f'masking.ratio={cfg.masking.ratio} leaves no visible patch of {spec.num_patches}.')
  strategy = masking.get_strategy(cfg.masking.name)
  if strategy.check:
    try:
      strategy.check(masking.strategy_params(cfg.masking, cfg.masking.name), spec.grid, keep)
    except ValueError as e:
      raise ConfigError(str(e)) from None
  _require(cfg.targets.name == 'pixels', f"targets.name={cfg.targets.name!r}: only 'pixels' exists.")
  _validate_method(cfg, spec)
  _require(cfg.batch_size > 0, f'batch_size={cfg.batch_size} must be positive.')
  _require(cfg.grad_accum_steps >= 1 and cfg.batch_size % cfg.grad_accum_steps == 0,
           f'grad_accum_steps={cfg.grad_accum_steps} must be >= 1 and divide '
           f'batch_size={cfg.batch_size}.')
  _require(cfg.total_steps > 0 or cfg.total_epochs > 0,
           'Set total_steps > 0 or total_epochs > 0 (schedule length).')
  for key in ('log_every_steps', 'checkpoint_every_steps'):
    _require(cfg[key] > 0, f'{key}={cfg[key]} must be positive.')
  _require(cfg.data.max_skipped_fraction >= 0, 'data.max_skipped_fraction must be >= 0.')
  _require(cfg.nan_policy in ('stop', 'skip'),
           f"nan_policy={cfg.nan_policy!r} must be 'stop' or 'skip'.")
  sizes = [cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor]
  _require(sum(s == -1 for s in sizes) <= 1 and all(s == -1 or s > 0 for s in sizes),
           f'mesh sizes (data, fsdp, tensor)={tuple(sizes)}: each must be positive, at most one -1.')
  _validate_eval(cfg.eval, cfg.probe)
  _require(cfg.visualize.num_images > 0,
           f'visualize.num_images={cfg.visualize.num_images} must be positive.')
  _validate_finetune(cfg.finetune)


def _validate_width(width_key: str, width: int, heads_key: str, heads: int) -> None:
  _require(width > 0 and heads > 0 and width % heads == 0,
           f'{width_key}width={width} must be a positive multiple of {heads_key}={heads}.')
  _require(width % 4 == 0, f'{width_key}width={width} must be divisible by 4 (2D sin-cos table).')


def _validate_vit(m: ml_collections.ConfigDict, key: str) -> None:
  """A ViT section (`model`, `teacher.model`): preset, patch size, width and heads."""
  _require(m.variant in ('', 'Ti', 'S', 'B', 'L', 'H'),
           f"{key}.variant={m.variant!r} is not a ViT preset; use Ti, S, B, L, H or '' with "
           f'{key}.width/depth/num_heads.')
  _require(m.patch_size > 0 and m.image_size > 0 and m.image_size % m.patch_size == 0,
           f'{key}.patch_size={m.patch_size} must divide {key}.image_size={m.image_size}.')
  from mim.models import mae
  width, _, heads = mae.VARIANTS[m.variant] if m.variant else (0, 0, 0)
  _validate_width(f'{key}.', m.width or width, f'{key}.num_heads', m.num_heads or heads)


def _validate_method(cfg: ml_collections.ConfigDict, spec) -> None:
  t, teach = cfg.targets, cfg.teacher
  for key in ('pixel_weight', 'loss_pred_weight', 'feature_weight', 'feature_ramp_epochs',
              'distill_weight'):
    _require(t[key] >= 0, f'targets.{key}={t[key]} must be >= 0.')
  _require(t.pixel_weight > 0 or not t.loss_pred_weight,
           'targets.loss_pred_weight > 0 ranks the pixel losses: keep targets.pixel_weight > 0.')
  _require(not t.loss_pred_weight or cfg.model.loss_predictor,
           f'targets.loss_pred_weight={t.loss_pred_weight} needs model.loss_predictor=True.')
  _require(not t.feature_weight or cfg.model.feature_head,
           f'targets.feature_weight={t.feature_weight} needs model.feature_head=True.')
  _require(cfg.masking.name != 'hard_patches' or cfg.model.loss_predictor,
           "masking.name='hard_patches' masks by the teacher's predicted losses: set "
           'model.loss_predictor=True (and targets.loss_pred_weight > 0 to train it).')
  _require(not t.feature_weight or 1 <= t.feature_top_k <= spec.depth,
           f'targets.feature_top_k={t.feature_top_k} must be in [1, {spec.depth}] (encoder depth).')
  _require(t.feature_loss in ('smooth_l1', 'mse'),
           f"targets.feature_loss={t.feature_loss!r} must be 'smooth_l1' or 'mse'.")
  _require(t.feature_beta > 0, f'targets.feature_beta={t.feature_beta} must be positive.')
  points = teach.momentum
  _require(len(points) >= 1 and all(len(p) == 2 and 0 <= p[1] <= 1 for p in points)
           and all(a[0] < b[0] for a, b in zip(points, points[1:])),
           f'teacher.momentum={points!r} must be (time, tau) pairs with increasing times and '
           'tau in [0, 1], e.g. ((0, 0.999), (100, 0.9999)).')
  _require(teach.momentum_unit in ('epochs', 'steps'),
           f"teacher.momentum_unit={teach.momentum_unit!r} must be 'epochs' or 'steps'.")
  _require(teach.momentum_shape in ('linear', 'cosine'),
           f"teacher.momentum_shape={teach.momentum_shape!r} must be 'linear' or 'cosine'.")
  from mim.models import mae  # local, as in validate
  _require(cfg.model.dtype in mae.COMPUTE_DTYPES,
           f"model.dtype={cfg.model.dtype!r} must be one of {mae.COMPUTE_DTYPES}.")
  _require(teach.dtype in mae.COMPUTE_DTYPES,
           f"teacher.dtype={teach.dtype!r} must be one of {mae.COMPUTE_DTYPES}.")
  _validate_distill(cfg, spec)


def _validate_distill(cfg: ml_collections.ConfigDict, spec) -> None:
  """The frozen teacher and the distillation term (mim/teacher.py, docs/distillation.md)."""
  t, teach, d = cfg.targets, cfg.teacher, cfg.distill
  _require(teach.kind in ('ema', 'frozen'), f"teacher.kind={teach.kind!r} must be 'ema' or 'frozen'.")
  _require(cfg.model.decoder or (t.pixel_weight == 0 and not cfg.model.loss_predictor
                                 and not cfg.model.feature_head and t.distill_weight > 0
                                 and d.student == 'encoder'),
           'model.decoder=False leaves an encoder only: set targets.pixel_weight=0, no '
           "loss predictor or feature head, and targets.distill_weight > 0 with distill.student='encoder'.")
  if teach.kind == 'ema':
    _require(not t.distill_weight, f'targets.distill_weight={t.distill_weight} distills a frozen '
             "teacher: set teacher.kind='frozen' and teacher.weights=PATH.")
    return
  from mim import masking
  _require(t.distill_weight > 0, "teacher.kind='frozen' serves the distillation term: set "
           'targets.distill_weight > 0 (and the distill section).')
  _require(bool(teach.weights), "teacher.kind='frozen' needs teacher.weights=PATH (a workdir, "
           'checkpoint, .safetensors, .npz, .pth or Hugging Face directory).')
  _require(not masking.get_strategy(cfg.masking.name).needs and not t.feature_weight,
           f"teacher.kind='frozen' gives distillation targets only; masking.name="
           f"{cfg.masking.name!r} and targets.feature_weight need teacher.kind='ema'.")
  _validate_vit(teach.model, 'teacher.model')
  from mim import teacher as teacher_lib
  frozen = teacher_lib.frozen_teacher(cfg)
  ts = frozen.spec
  _require(0 <= teach.blocks <= ts.depth,
           f'teacher.blocks={teach.blocks} must be in [0, {ts.depth}] (0 = all of teacher.model).')
  for name, layers, depth, runs in (('teacher_layers', d.teacher_layers, ts.depth, frozen.blocks),
                                    ('student_layers', d.student_layers, spec.depth, spec.depth)):
    _require(len(layers) >= 1, f'distill.{name} must name at least one block.')
    for i in layers:
      _require(-depth <= i < depth and i % depth < runs,
               f'distill.{name} has block {i}, but blocks 0..{runs - 1} run (or -{depth}..-1 from '
               f'the end of {depth})' + (f' with teacher.blocks={teach.blocks}' if runs < depth else '') + '.')
  if ts.image_size != spec.image_size or ts.grid != spec.grid:
    _require(teach.resample,
             f'The teacher sees {ts.image_size} px in a {ts.grid[0]}x{ts.grid[1]} grid (teacher.model), '
             f'the student {spec.image_size} px in {spec.grid[0]}x{spec.grid[1]}: set '
             "teacher.resample=True to resize the images to the teacher's size and its tokens to "
             "the student's grid, or make teacher.model match.")
  _require(d.student in ('encoder', 'decoder'),
           f"distill.student={d.student!r} must be 'encoder' or 'decoder'.")
  _require(d.student == 'encoder' or cfg.model.decoder,
           "distill.student='decoder' needs model.decoder=True.")
  _require(d.tokens == 'visible' if d.student == 'encoder' else d.tokens in ('all', 'masked'),
           f"distill.tokens={d.tokens!r}: the encoder sees the visible tokens ('visible'); the "
           "decoder's are 'all' or 'masked'.")
  _require(d.head in ('linear', 'mlp'), f"distill.head={d.head!r} must be 'linear' or 'mlp'.")
  _require(d.head_hidden >= 0, f'distill.head_hidden={d.head_hidden} must be >= 0.')
  num_students = len(d.student_layers) if d.student == 'encoder' else 1
  _require(d.align in ('direct', 'dynamic'), f"distill.align={d.align!r} must be 'direct' or 'dynamic'.")
  _require(d.align == 'dynamic' or num_students in (1, len(d.teacher_layers)),
           f"distill.align='direct' pairs layers: give one student layer or as many as "
           f'teacher_layers ({len(d.teacher_layers)}), not {num_students}.')
  _require(d.align == 'direct' or (d.student == 'encoder' and num_students >= len(d.teacher_layers)),
           "distill.align='dynamic' mixes encoder layers: distill.student='encoder' with at "
           'least as many student_layers as teacher_layers.')
  _require(d.normalize in ('target_layer_norm', 'l2', 'none'),
           f"distill.normalize={d.normalize!r} must be 'target_layer_norm', 'l2' or 'none'.")
  _require(d.loss in ('smooth_l1', 'mse', 'l1', 'cosine'),
           f"distill.loss={d.loss!r} must be 'smooth_l1', 'mse', 'l1' or 'cosine'.")
  _require(d.beta > 0, f'distill.beta={d.beta} must be positive.')
  _require(not d.morph or d.tokens == 'all',
           "distill.morph=True morphs every token: needs distill.student='decoder', tokens='all'.")
  _require(d.morph_branches >= 1 and d.morph_max_steps >= 1
           and 0 <= d.morph_max_tokens <= spec.num_patches,
           f'distill.morph_branches and morph_max_steps must be >= 1 and morph_max_tokens in '
           f'[0, {spec.num_patches}].')


def _validate_eval(e: ml_collections.ConfigDict, p: ml_collections.ConfigDict) -> None:
  pools = ('cls', 'avg', 'cls_prenorm', 'avg_prenorm')
  for name in e.protocols:
    _require(name in ('knn', 'linear', 'attentive'),
             f'eval.protocols has {name!r}; choose from knn, linear, attentive.')
  _require(e.knn_pool in pools + ('both',),
           f'eval.knn_pool={e.knn_pool!r} must be one of {pools + ("both",)}.')
  _require(all(k > 0 for k in (e.knn_k, *e.knn_ks)), 'eval.knn_k and eval.knn_ks must be positive.')
  _require(e.knn_temperature > 0, f'eval.knn_temperature={e.knn_temperature} must be positive.')
  _require(e.batch_size > 0, f'eval.batch_size={e.batch_size} must be positive.')
  _require(isinstance(e.every_steps, int) and e.every_steps >= 0,
           f'eval.every_steps={e.every_steps!r} must be an integer >= 0 (0 = no online probes).')
  _require(e.ridge_alpha > 0, f'eval.ridge_alpha={e.ridge_alpha} must be positive.')
  _require(p.mode in ('augment', 'cached'), f"probe.mode={p.mode!r} must be 'augment' or 'cached'.")
  _require(p.epochs > 0 and 0 <= p.warmup_epochs <= p.epochs,
           f'probe.epochs={p.epochs} must be positive and probe.warmup_epochs={p.warmup_epochs} '
           'in [0, epochs].')
  _require(p.batch_size > 0 and p.base_lr > 0, 'probe.batch_size and probe.base_lr must be positive.')
  _require(p.linear_pool in pools, f'probe.linear_pool={p.linear_pool!r} must be one of {pools}.')
  _require(p.num_queries > 0 and p.value_divisor > 0,
           'probe.num_queries and probe.value_divisor must be positive.')


def _validate_finetune(f: ml_collections.ConfigDict) -> None:
  _require(f.num_classes >= 0,
           f'finetune.num_classes={f.num_classes} must be >= 0 (0 = from the data).')
  _require(0 < f.layer_decay <= 1,
           f'finetune.layer_decay={f.layer_decay} must be in (0, 1], e.g. 0.65 (1.0 = no decay).')
  _require(0 <= f.drop_path < 1, f'finetune.drop_path={f.drop_path} must be in [0, 1), e.g. 0.1.')
  _require(f.head_init_std >= 0, f'finetune.head_init_std={f.head_init_std} must be >= 0.')
  for key in ('mixup_alpha', 'cutmix_alpha'):
    _require(f[key] >= 0, f'finetune.{key}={f[key]} must be >= 0 (0 = off).')
  for key in ('mix_switch_prob', 'random_erasing'):
    _require(0 <= f[key] <= 1, f'finetune.{key}={f[key]} must be a probability in [0, 1].')
  _require(0 <= f.label_smoothing < 1,
           f'finetune.label_smoothing={f.label_smoothing} must be in [0, 1), e.g. 0.1.')
  _require(f.rand_augment_ops >= 0 and 0 <= f.rand_augment_magnitude <= 10
           and f.rand_augment_std >= 0,
           f'finetune.rand_augment_ops={f.rand_augment_ops} (>= 0, 0 = off), '
           f'rand_augment_magnitude={f.rand_augment_magnitude} (in [0, 10]) and '
           f'rand_augment_std={f.rand_augment_std} (>= 0): timm rand-m9-mstd0.5 is 2, 9, 0.5.')
  _require(f.eval_every_epochs >= 0,
           f'finetune.eval_every_epochs={f.eval_every_epochs} must be >= 0 (0 = only at the end).')


def check_batch_divides(batch_size: int, device_count: int, process_count: int) -> None:
  """`batch_size` is the (micro-)batch one step computes at once: batch_size / grad_accum_steps."""
  _require(batch_size % device_count == 0,
           f'batch_size / grad_accum_steps = {batch_size} is not divisible by the device count '
           f'{device_count}; use a multiple of {device_count}.')
  _require(batch_size % process_count == 0,
           f'batch_size={batch_size} is not divisible by the process count {process_count}.')

