"""The shared recipe every config starts from (TransReID-style defaults).

Each choice that the OGFR paper would fix but that we could not read from it is a field
here with a documented default, so that a run can set it with `--config.FIELD=VALUE` and an
ablation can switch it off. Files under configs/ call `base_config()` and override what their protocol changes.
"""

import ml_collections

# Backbone sizes: (width, depth, heads). 'tiny' is for tests and the synthetic benchmark.
VIT_SIZES = {
    'tiny': (64, 2, 2),
    'mini': (128, 4, 4),
    'small': (384, 12, 6),
    'base': (768, 12, 12),
    'large': (1024, 24, 16),
}


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  # ImageNet (or ReID) backbone weights for teacher and student: AugReg/big_vision .npz,
  # timm/TransReID PyTorch (.pth/.bin) or .safetensors. '' = random init.
  c.init_from = ''
  c.init_format = 'auto'  # 'auto' (from the file), 'npz', 'torch', 'safetensors' or 'orbax'

  # --- which data --------------------------------------------------------------------------
  c.dataset = ml_collections.ConfigDict()
  c.dataset.name = 'synthetic'  # a name registered in ogfr_jax.data.datasets
  c.dataset.root = ''  # the dataset's own folder; for 'synthetic' the cache folder ('' = default)
  c.dataset.merge_train_val = False  # msmt17 only: train on list_train + list_val
  # Cross-domain protocols (Occluded-REID / Partial-REID): train on `name`, test on this one.
  c.dataset.test_name = ''  # '' = test on the same dataset
  c.dataset.test_root = ''
  # Validation: this many training identities leave training and become the query/gallery
  # evaluated instead of the test split (data/validation.py), for choosing a recipe. 0 = off.
  c.dataset.val_ids = 0

  # The embedded benchmark's own fields are an extension (section `synthetic`, added by
  # data/synthetic_config.add_config): a config that uses them adds them.

  # --- input pipeline ----------------------------------------------------------------------
  c.input = ml_collections.ConfigDict()
  c.input.height = 256
  c.input.width = 128
  c.input.ids_per_batch = 16  # P
  c.input.images_per_id = 4  # K; the global train batch is P * K
  c.input.eval_batch_size = 128  # global
  c.input.num_workers = 2  # grain worker processes (0 = in the main process)
  c.input.prefetch = 2
  # Batches transferred to the devices ahead of the train step (and of feature extraction)
  # by a background thread; 0 = transfer in the loop. Checkpoints keep the input state of the
  # batches consumed, so resuming does not depend on it.
  c.input.device_prefetch = 2
  c.input.flip_prob = 0.5
  c.input.pad = 10
  c.input.erase_prob = 0.5
  c.input.erase_area = (0.02, 0.4)
  # Resampling of the train-time resize: 'bilinear' or 'bicubic' (TransReID's train resize).
  # Evaluation resizes bilinearly either way, as TransReID's test transform does.
  c.input.train_resize = 'bilinear'
  c.input.mean = (0.5, 0.5, 0.5)
  c.input.std = (0.5, 0.5, 0.5)
  # What to do with an image that cannot be decoded during training: 'fail' or 'skip'.
  c.input.corrupt_image_policy = 'fail'
  # Where the donor boxes of the 'person' / 'crop' occluders (pixels of another row of the
  # global batch) are pasted: 'device' (the train step gathers them from the global image
  # batch, so each process decodes only its own rows) or 'host' (a process decodes and
  # augments again every donor row it does not own). Same pixels either way
  # (data/donor_exchange.py).
  c.input.donor_exchange = 'device'

  # --- occlusion synthesis for the student --------------------------------------------------
  c.occlusion = ml_collections.ConfigDict()
  c.occlusion.enabled = True
  c.occlusion.prob = 0.75  # chance that the student's view of an image is occluded
  # Pattern types ('object', 'texture', 'person', 'crop', 'bank'); pattern id k = 1 + index
  # here, 0 means "no occluder".
  c.occlusion.patterns = ('object', 'texture', 'person', 'crop')
  c.occlusion.holdout = ()  # pattern names never synthesised during training
  c.occlusion.placements = ('bottom', 'top', 'left', 'right', 'center')
  c.occlusion.area = (0.15, 0.5)  # occluded fraction of the image
  # Occluder cut-outs (RGBA PNGs) for the 'bank' pattern; empty: <dataset root>/occluders.
  c.occlusion.bank_dir = ''

  # --- model -------------------------------------------------------------------------------
  c.model = ml_collections.ConfigDict()
  c.model.size = 'base'  # a key of VIT_SIZES
  c.model.patch_size = 16
  c.model.stride = 12  # overlapping patches (TransReID: 12; 11 on Occluded-Duke)
  c.model.mlp_ratio = 4.0
  c.model.drop_path = 0.1
  c.model.sie = True  # camera embedding (side information embedding)
  c.model.sie_weight = 3.0
  # TransReID jigsaw patch module (part branch), with TransReID's shift 5, 2 shuffle groups
  # and 4 parts (models/vit.py).
  c.model.jpm = False
  # Compute dtype: float32, bfloat16 or 'auto' (bfloat16 on GPU/TPU, float32 on CPU;
  # ogfr_jax/precision.py). Parameters and optimizer state stay float32.
  c.model.dtype = 'float32'
  c.model.teacher = True  # False: student only (ViT baseline ablations; no KD, no FEPM)
  # Occlusion-Aware ViT: learnable pattern embeddings E[0..K] added to the student's tokens.
  c.model.pattern_embed = True
  # Chance per training image that the student gets E[0] instead of E[k] (it still predicts
  # k): E[0] is what the student is given at test time, where the pattern is unknown.
  c.model.pattern_dropout = 0.0
  # What the pattern classifier reads: 'bn_feat' (the BNNeck output) or 'feat' (the CLS
  # feature). Pre-BN CLS features of a trained ReID ViT share a large constant component and
  # differ by small offsets, which a linear head on 'feat' barely resolves.
  c.model.pattern_head_input = 'bn_feat'
  # 'cudnn': fused attention on NVIDIA GPUs (bf16/fp16 only); 'auto': cudnn where it applies.
  c.model.attention_impl = 'xla'
  # 'plain': flax/jax formulations everywhere (what GPUs and TPUs run). 'cpu': the XLA:CPU
  # formulations of models/cpu_kernels.py (erf GELU, transposed-operand weight gradients,
  # heads-major attention with a hand-written backward): same values, faster on a CPU.
  c.model.kernels = 'plain'
  # Activation memory against recomputation in the backward pass (models/vit.py, remat_block):
  # 'none' keeps every block's activations (fastest); 'dots' keeps only the linear layers'
  # outputs (+2% FLOPs); 'block' keeps only each block's input (+22% FLOPs, least memory).
  # Same results. XLA:CPU schedules the recomputation early and saves no memory with it.
  c.model.remat = 'none'
  # The student's occluder-token erasure, an extension beyond our reading of the paper, is an
  # extension section (`student_erase`, models/student.add_config).

  # --- Feature Erasing and Purification Module (teacher) -------------------------------------
  # The purification recipe: the one setting measured to act (docs/results.md,
  # "Purification"), shared by every config. The agent scores the patch tokens of the patch
  # embedding (layer 0), its greedy action takes the tokens above a threshold calibrated on
  # training batches to select `share` of them, and besides REINFORCE (leave-one-out baseline
  # over two sampled actions per image) it learns the identity-consistency labels
  # (loss.agent_consistency_weight) with its own Adam (optim.agent_lr, cosine decay).
  c.fepm = ml_collections.ConfigDict()
  c.fepm.enabled = True
  c.fepm.layer = 0  # agent acts after block L; negative counts from the end (-1: before last)
  # 'agent' (REINFORCE), or the controls 'random' (random tokens) and 'oracle' (exactly the
  # tokens covered by the batch's planted contamination, `contam_mask`: the upper-bound row
  # on the synthetic benchmark, whose side files record it).
  c.fepm.selection = 'agent'
  c.fepm.random_fraction = 0.1  # share of the patch tokens the 'random' control replaces
  c.fepm.agent_hidden = 128
  c.fepm.prior_logit = -2.0  # initial bias of the agent: ~12% selection rate at start
  # Share of each training batch's patch tokens that the greedy action selects (a running
  # threshold on the agent's scores, fixed at evaluation) and that the consistency labels label.
  c.fepm.share = 0.1
  # The agent's token scores averaged over this (rows, cols) window of grid cells (odd sizes)
  # before the policy, the greedy rule and the report read them: contamination covers whole
  # regions (a passer-by, a garment) while a per-token scorer errs token by token. (1, 1): off.
  c.fepm.score_window = (3, 1)
  # PatchDrop-style bounds of the Bernoulli policy: p = lo + (hi - lo) * sigmoid(logit), so no
  # token's selection probability can collapse to 0 or 1. (0, 1): unbounded.
  c.fepm.prob_bounds = (0.02, 0.6)
  # 'self_critical' (b = reward of the greedy action, the paper's reading) or 'leave_one_out'
  # (b = mean reward of the image's other num_samples - 1 actions).
  c.fepm.baseline = 'leave_one_out'
  c.fepm.num_samples = 2  # sampled actions per image; each costs one reward pass
  c.fepm.eta = 0.02  # reward penalty per replaced fraction
  c.fepm.entropy_weight = 0.001
  # The first warmup_fraction of the run trains the teacher on clean images, without the
  # agent's reward; then all train jointly. A fraction, so a shortened run still reaches it.
  c.fepm.warmup_fraction = 0.15
  # The block whose output tokens the identity-consistency labels compare (1-based; 0: the
  # patch embedding; negative from the end, -1: the last block). It must not come before
  # fepm.layer: the labels continue the pass the agent reads.
  c.fepm.consistency_block = 1
  # Earlier images of each training identity that those labels also compare with (0: only the
  # batch's other images). A ring buffer per identity in 'batch_stats', checkpointed with the
  # state: identities x this x patch tokens x width float32 (Occluded-Duke at ViT-B/16 stride
  # 11 and 4: 702 x 4 x 242 x 768 x 4 B = 2.1 GB, split over the fsdp axis).
  c.fepm.consistency_memory = 4

  # --- losses ------------------------------------------------------------------------------
  c.loss = ml_collections.ConfigDict()
  c.loss.id_weight = 1.0
  c.loss.label_smoothing = 0.0
  c.loss.triplet_weight = 1.0
  c.loss.triplet_margin = 0.0  # 0 -> soft margin
  # Which feature the triplet loss reads: 'feat' (pre-BN, TransReID/BNNeck) or 'bn_feat'. A
  # distance loss on pre-BN features can be lowered by shrinking every distance, and when the
  # hardest positive of most anchors is an occluded view farther than the nearest negative
  # (soft margin: log 2 at zero spread) the features collapse while the scale-free ID loss
  # after the BNNeck does not notice; the BNNeck output has unit variance per dimension.
  c.loss.triplet_feature_input = 'feat'
  # Which student views the triplet loss takes as anchors and positives: 'all', or
  # 'unoccluded' (views the synthesiser left holistic, pattern 0; negatives still come from
  # every view). With 'all', the batch-hard positive of most anchors is a synthesised occluded
  # view, which is the collapse described above; 'unoccluded' leaves occluded views to the ID
  # and distillation losses and keeps them away from other identities as negatives.
  c.loss.student_triplet_views = 'all'
  c.loss.kd_weight = 1.0
  # Feature distillation: the mean of 1 - cos(student, teacher).
  # Which features are distilled: 'bn_feat' (BNNeck output: centred and scaled per dimension,
  # so the loss sees what separates identities) or 'feat' (pre-BN CLS feature, whose shared
  # constant component makes 1 - cos nearly 0 for any pair).
  c.loss.kd_feature_input = 'bn_feat'
  c.loss.kd_logit_weight = 1.0
  c.loss.kd_temperature = 4.0
  c.loss.pattern_weight = 0.1
  c.loss.agent_weight = 1.0
  # An auxiliary for the agent (not in the paper): binary cross-entropy of its token logits on
  # the clean image against the tokens that no other image of the same identity in the P x K
  # batch (or the identity memory) matches nearby (fepm.consistency_*). 0 = off.
  c.loss.agent_consistency_weight = 1.0
  c.loss.teacher_weight = 1.0  # teacher's own ID + triplet terms
  c.loss.student_weight = 1.0

  # --- optimisation ------------------------------------------------------------------------
  c.optim = ml_collections.ConfigDict()
  c.optim.name = 'sgd'  # 'sgd' (momentum) or 'adamw'
  c.optim.lr = 0.008  # for the global batch of 64; scaled linearly with the batch
  c.optim.base_batch_size = 64
  c.optim.momentum = 0.9
  c.optim.weight_decay = 1e-4
  c.optim.bias_lr_factor = 2.0
  c.optim.no_decay_norm_and_embed = True
  c.optim.warmup_epochs = 5
  # 'warmup_cosine': per step, linear warm-up from 1% of the peak, cosine decay to lr_floor x
  # peak. 'transreid': per epoch, as TransReID's timm CosineLRScheduler (optim.lr_schedule).
  c.optim.schedule = 'warmup_cosine'
  c.optim.lr_floor = 0.01  # the last learning rate, as a fraction of the peak
  c.optim.grad_clip = 0.0  # 0 = off
  # The agent's own Adam, decayed (cosine) to 1% of agent_lr over the run.
  c.optim.agent_lr = 1e-2

  # --- schedule, logging, checkpoints --------------------------------------------------------
  c.train = ml_collections.ConfigDict()
  c.train.epochs = 120
  c.train.steps_per_epoch = 0  # 0 = what the P x K sampler yields per pass over the ids
  c.train.log_every = 50
  c.train.eval_every_epochs = 40
  c.train.checkpoint_every = 500  # steps
  c.train.keep_checkpoints = 2
  c.train.nonfinite_policy = 'stop'  # NaN/inf loss or grads: 'stop' (keep last good ckpt), 'skip'
  c.train.stop_check_every = 10  # steps between SIGTERM agreements of processes (no JAX service)
  # A checkpoint that cannot be restored or fails its checksums at resume: 'fall_back' moves
  # it to checkpoints/corrupt-<step> (kept, never deleted) and resumes from the newest one
  # that restores; 'refuse' stops with the reason instead.
  c.train.damaged_checkpoint = 'fall_back'
  # nonfinite_policy='skip': the run stops once more than this share of its total steps
  # were skipped (counted over the whole run, resumes included). 1.0 never stops.
  c.train.max_skipped_share = 0.1

  # --- evaluation --------------------------------------------------------------------------
  c.eval = ml_collections.ConfigDict()
  c.eval.feature = 'pre_bn'  # student feature: 'pre_bn' or 'post_bn'
  c.eval.normalize = True  # L2-normalise before Euclidean distance
  c.eval.flip = False  # average features of the image and its mirror
  c.eval.rerank = False
  c.eval.rerank_k1 = 20
  c.eval.rerank_k2 = 6
  c.eval.rerank_lambda = 0.3
  # 'exact': k-reciprocal re-ranking on the dense (q+g)^2 distance matrix on the host (refused
  # above rerank_max_bytes); 'approx': built from each image's rerank_topn nearest
  # neighbours, found on the devices in chunks, memory O((q+g) * topn) -- equal to 'exact'
  # when rerank_topn >= q+g; 'auto': 'exact' when its matrix fits in rerank_max_bytes, else
  # 'approx'. The mode used is logged and written to the results as `rerank_mode`.
  c.eval.rerank_mode = 'auto'
  c.eval.rerank_topn = 100
  c.eval.rerank_max_bytes = 4 * 1024**3
  c.eval.max_rank = 50
  # The camera embedding (SIE) of test images from cameras the model never trained with (a
  # test set other than the training set, dataset.test_name): 'mean' of the trained camera
  # embeddings, or 'index' (the test set's own camera ids index the training cameras' table).
  # 'mean' gives query and gallery the same offset instead of two unrelated training cameras.
  c.eval.unseen_camera = 'mean'
  # The named evaluators of the final evaluation (evaluator.py): 'student_ranking' (the
  # run's score), and with FEPM 'fepm_selection' (selection rate; precision and recall where
  # contamination is planted), 'teacher_purification' (teacher mAP purified vs clean, about
  # twice the student's pass) and 'token_ranking' (the agent's scores as a ranking of the
  # planted contamination).
  c.eval.evaluators = ('student_ranking', 'fepm_selection')
  # Query rows per step of the on-device distance and ranking computation (rounded up to a
  # multiple of the device count); device memory about query_chunk x gallery x 12 bytes.
  c.eval.query_chunk = 256

  # --- devices -----------------------------------------------------------------------------
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # -1: all devices not used by other axes
  c.mesh.fsdp = 1
  return c


def transreid_recipe(c: ml_collections.ConfigDict) -> None:
  """TransReID's training recipe, for the real-data configs (damo-cv/TransReID:
  configs/OCC_Duke/vit_transreid_stride.yml, config/defaults.py, solver/make_optimizer.py,
  solver/scheduler_factory.py, datasets/make_dataloader.py). base_config() already has its
  batch (16 ids x 4), SGD at 0.008 for 64 images, 120 epochs, 5 warm-up epochs, flip 0.5,
  pad 10, erasing probability 0.5, mean = std = 0.5, SIE x3, soft-margin triplet and BNNeck.

  Aligned here:
  - weight decay 1e-4 on every parameter, norms, embeddings and biases included, and every
    bias at 2x the learning rate (make_optimizer: 'bias' in the name -> BIAS_LR_FACTOR 2,
    WEIGHT_DECAY_BIAS 1e-4);
  - the schedule per epoch, from 0.01 x base to base over 5 epochs, cosine to 0.002 x base
    (scheduler_factory, timm's CosineLRScheduler; optim.transreid_schedule);
  - bicubic train resize (make_dataloader: T.Resize(interpolation=3)); tests resize
    bilinearly, as there;
  - random erasing over 0.02 to 1/3 of the area (timm's RandomErasing defaults).

  Departures, with the reason:
  - JPM stays off (model.jpm; TransReID's OCC_Duke recipe has it on, and the TransReID*
    figures the configs quote include it). OGFR's features are the CLS feature of teacher
    and student; the part branch would start from the tokens the FEPM has just purified, a
    combination the method does not describe, and a student with parts cannot be exported
    to a timm ViT (pretrained.lossy_parts). Its cost is small: +1.5% FLOPs per train step
    and +18.5 M parameters (docs/results.md, "Performance"). `--config.model.jpm=True` turns
    it on (the import starts the branch as a copy of the last block and norm).
  - The student's triplet takes only its unoccluded views as anchors and positives
    (loss.student_triplet_views='unoccluded'). TransReID has no synthesised occluded views;
    over all views the hardest positive of most anchors is a synthesised occluded view, the
    soft-margin triplet then drives every distance towards 0 and the pre-BN feature that
    evaluation reads collapses (synthetic benchmark, 3 seeds x 20 epochs, full OGFR: student
    mAP 0.515 +- 0.001 over all views against 0.546 +- 0.006 over unoccluded ones; the
    student triplet loss sat at 0.70, about log 2; docs/results.md).
  - The erased box is filled with uniform random pixels before normalisation, not N(0, 1)
    in normalised space (data/augment.random_erase: the pipeline stays uint8 to the device).
  """
  c.optim.no_decay_norm_and_embed = False
  c.optim.bias_lr_factor = 2.0
  c.optim.weight_decay = 1e-4
  c.optim.schedule = 'transreid'
  c.optim.lr_floor = 0.002
  c.input.train_resize = 'bicubic'
  c.input.erase_area = (0.02, 1 / 3)
  c.model.jpm = False
  c.loss.student_triplet_views = 'unoccluded'


# Sections that only some configs have, beside the code they concern (fast-reid's add_*_config):
# section name -> (module, function adding the section with its defaults to a config).
EXTENSIONS = {'synthetic': ('ogfr_jax.data.synthetic_config', 'add_config'),
              'student_erase': ('ogfr_jax.models.student', 'add_config')}


def extend(config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
  """Adds the extension section `name` (a key of EXTENSIONS) to `config`, if absent."""
  import importlib  # pylint: disable=g-import-not-at-top
  module, function = EXTENSIONS[name]
  return getattr(importlib.import_module(module), function)(config)


def parse_arg(arg, **defaults):
  """Parses 'k=v,k2=v2' config args (big_vision style); bare 'k' means k=True."""
  out = dict(defaults)
  for item in filter(None, (arg or '').split(',')):
    key, _, value = item.partition('=')
    if key not in defaults:
      raise ValueError(f'unknown config arg {key!r}; known: {sorted(defaults)}')
    if not value:
      out[key] = True
    else:
      kind = type(defaults[key])
      out[key] = value.lower() in ('1', 'true', 'yes') if kind is bool else kind(value)
  return ml_collections.ConfigDict(out)


def shrink_for_local_run(c: ml_collections.ConfigDict) -> None:
  """A few tiny steps of the same pipeline: for smoke tests of a real-dataset config."""
  c.model.size = 'tiny'
  c.input.ids_per_batch, c.input.images_per_id = 4, 2
  c.input.eval_batch_size = 16
  c.input.num_workers = 0
  c.train.epochs = 1
  c.train.steps_per_epoch = 4
  c.train.log_every = 2


def sibling_config(config_file: str, name: str, arg=None) -> ml_collections.ConfigDict:
  """`get_config(arg)` of the config file `name` (e.g. 'synthetic.py') in the folder of
  `config_file` (a config's own __file__): how one config builds on another."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  path = os.path.join(os.path.dirname(os.path.abspath(config_file)), name)
  if not os.path.exists(path):
    raise ValueError(f'no config file {path}')
  spec = importlib.util.spec_from_file_location(f'ogfr_config_{name[:-3]}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)
