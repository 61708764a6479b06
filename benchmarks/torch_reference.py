"""PyTorch + timm reference of one OGFR train step, for judging the speed of ogfr_jax's step.

  python benchmarks/torch_reference.py --size base --stride 12 --batch 8 --steps 1 --repeats 3
  python -m ogfr_jax.bench --torch-python /path/to/venv/bin/python   # runs this, compares

Standalone on purpose: it imports only torch, timm, numpy and the standard library, so it runs
in its own environment and never shares a process (or a thread pool) with JAX. It builds the
same network as `ogfr_jax.models.ogfr.OGFR` with timm's VisionTransformer blocks and does the
same work per step as `ogfr_jax.train.train_step` with the default config:

- teacher and student ViTs: overlapping conv patch embedding (kernel `patch`, stride
  `stride`), CLS and position embeddings for that grid, SIE camera embedding x sie_weight,
  pre-norm blocks with stochastic depth growing linearly to `drop_path`, final LayerNorm;
- per branch a BNNeck (batch-statistics BatchNorm with a scale and no shift) and a bias-free
  linear ID classifier, both in float32;
- FEPM on the teacher: after block L the agent (LayerNorm -> Linear -> GELU -> Linear, float32,
  on detached patch tokens) scores each patch, a Bernoulli action picks tokens, which become a
  learnable token + their position embedding, and blocks [L, depth) run on the result;
- the reward passes (sampled action, clean, greedy action) batched into one no-grad call
  through blocks [L, depth) without stochastic depth, normalised with the teacher batch's BN
  statistics;
- the student adds the pattern embedding E[k] to every token; a pattern head reads its BNNeck
  feature;
- losses: ID cross-entropy, batch-hard soft-margin triplet on pre-BN features, KD (1 - cos on
  BNNeck features, KL on logits at T=4), pattern CE, REINFORCE with the self-critical baseline
  and an entropy bonus; backward; global gradient norm; SGD with momentum and coupled weight
  decay over the TransReID parameter groups (or AdamW) and Adam for the agent.

Differences that remain (none changes the matrix work: the parameter counts are equal, and
on ViT-B/16 stride 12 batch 8 the counted FLOPs are within 1% of XLA's):
- ogfr_jax's step ends with a non-finite guard, a select between the new and the old
  parameters, optimizer state and BN statistics. It is memory-bound elementwise work and is
  left out here, because mirroring it in eager PyTorch means copying the whole state every
  step. Its cost in ogfr_jax on the shared 2-core CPU (load average ~10), ViT-B (172.8 M
  parameters): update alone 0.2 s, update + gradient norm + guard 1.2 s per step (this
  reference: norm + SGD + Adam 0.4 s).
- The learning-rate schedule (a scalar per step) is a constant here, so over a short run the
  loss falls faster than in ogfr_jax, whose warm-up starts at 1% of the peak. At
  initialisation the loss terms agree (tiny model: total 33.3 here, 32.3 in ogfr_jax, with
  different random weights).
- --amp is PyTorch's autocast: matmuls in bfloat16, but the residual stream stays float32;
  ogfr_jax's model.dtype=bfloat16 keeps the activations in bfloat16.
- Images arrive here as float32 model input; ogfr_jax's step receives uint8 pixels and
  normalises them on the device (one elementwise pass over the images).
- BN running variance: PyTorch convention (unbiased) vs flax's (biased); same cost.
- FLOP count: `torch.utils.flop_counter` counts matmuls, convolutions and attention only, and
  on the CPU it does not see the fused attention kernel, so the counted step runs timm's
  unfused attention (same matmuls). XLA's cost analysis also counts elementwise work, so its
  figure is somewhat higher for the same step.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import time

# libgomp's threads spin while they wait for each other. On a CPU shared with other busy
# processes a spinning thread burns the time slice that the thread it waits for needs: on the
# 2-core development VM at load ~5, a tiny-model step took 1.77 s with the default policy and
# 0.022 s with passive waiting (0.017 s with one thread). It must be set before torch loads
# OpenMP; set OMP_WAIT_POLICY=ACTIVE in the environment to measure the default behaviour.
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import timm  # noqa: E402
from timm.models.vision_transformer import VisionTransformer  # noqa: E402

# (width, depth, heads): the same numbers as ogfr_jax.config_defaults.VIT_SIZES (this file must
# not import ogfr_jax; the bench compares the widths it reports with its own).
VIT_SIZES = {
    'tiny': (64, 2, 2),
    'mini': (128, 4, 4),
    'small': (384, 12, 6),
    'base': (768, 12, 12),
    'large': (1024, 24, 16),
}
# Parameter names that go without weight decay in the TransReID groups (ogfr_jax/optim.py).
EMBED_NAMES = ('cls_token', 'pos_embed', 'sie_embed', 'pattern_embed', 'replace_token')


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--size', default='base', choices=sorted(VIT_SIZES))
  p.add_argument('--patch', type=int, default=16)
  p.add_argument('--stride', type=int, default=12)
  p.add_argument('--height', type=int, default=256)
  p.add_argument('--width', type=int, default=128)
  p.add_argument('--batch', type=int, default=8, help='global batch, P x K')
  p.add_argument('--images-per-id', type=int, default=4, help='K of the P x K batch')
  p.add_argument('--num-classes', type=int, default=702)
  p.add_argument('--num-cameras', type=int, default=6)
  p.add_argument('--num-patterns', type=int, default=5, help='K + 1 pattern embeddings')
  p.add_argument('--mlp-ratio', type=float, default=4.0)
  p.add_argument('--drop-path', type=float, default=0.1)
  p.add_argument('--sie-weight', type=float, default=3.0, help='0 turns SIE off')
  p.add_argument('--fepm-layer', type=int, default=-1, help='L; negative counts from the end')
  p.add_argument('--agent-hidden', type=int, default=128)
  p.add_argument('--prior-logit', type=float, default=-2.0)
  p.add_argument('--optimizer', default='sgd', choices=['sgd', 'adamw'])
  p.add_argument('--lr', type=float, default=None, help='default: 0.008 x batch / 64')
  p.add_argument('--weight-decay', type=float, default=1e-4)
  p.add_argument('--amp', action='store_true', help='bfloat16 autocast, float32 weights')
  p.add_argument('--threads', type=int, default=0, help='0: os.cpu_count()')
  p.add_argument('--device', default='auto', help="'auto' (CUDA if present), 'cpu', 'cuda'")
  p.add_argument('--steps', type=int, default=5, help='steps per timed repeat')
  p.add_argument('--repeats', type=int, default=3)
  p.add_argument('--warmup', type=int, default=2)
  p.add_argument('--no-flops', action='store_true',
                 help='skip the FLOP count (one extra untimed step)')
  p.add_argument('--seed', type=int, default=0)
  return p.parse_args(argv)


# --- model ------------------------------------------------------------------------------------


class ReIDViT(nn.Module):
  """timm VisionTransformer used as a container of blocks and norms, with the ReID embedding.

  timm's PatchEmbed has no stride option, so its projection is swapped for a strided conv and
  the position embedding is re-made for the overlapping grid; `embed`/`run_blocks`/`norm` then
  give the staged calls that the FEPM needs (the agent acts between blocks).
  """

  def __init__(self, dim, depth, heads, grid, args):
    super().__init__()
    self.vit = VisionTransformer(
        img_size=(args.height, args.width), patch_size=args.patch, num_classes=0,
        global_pool='token', embed_dim=dim, depth=depth, num_heads=heads,
        mlp_ratio=args.mlp_ratio, qkv_bias=True, drop_path_rate=args.drop_path)
    self.vit.patch_embed.proj = nn.Conv2d(3, dim, args.patch, stride=args.stride)
    self.vit.pos_embed = nn.Parameter(torch.empty(1, 1 + grid[0] * grid[1], dim))
    nn.init.trunc_normal_(self.vit.pos_embed, std=0.02)
    self.sie_weight = args.sie_weight
    self.sie_embed = (nn.Parameter(nn.init.trunc_normal_(torch.empty(args.num_cameras, dim),
                                                         std=0.02))
                      if args.sie_weight else None)

  def embed(self, image, camid, extra=None):
    x = self.vit.patch_embed.proj(image).flatten(2).transpose(1, 2)
    cls = self.vit.cls_token.expand(x.shape[0], -1, -1)
    x = torch.cat([cls, x], dim=1) + self.vit.pos_embed
    if self.sie_embed is not None:
      x = x + self.sie_weight * self.sie_embed[camid][:, None]
    if extra is not None:
      x = x + extra[:, None]
    return x

  def run_blocks(self, x, start, stop):
    for block in self.vit.blocks[start:stop]:
      x = block(x)
    return x

  def norm(self, x):
    return self.vit.norm(x)


class BNNeck(nn.Module):
  """BatchNorm1d with a scale and no shift that can normalise with given statistics and
  returns the ones it used (the reward passes reuse the teacher batch's)."""

  def __init__(self, dim, momentum=0.1, eps=1e-5):
    super().__init__()
    self.weight = nn.Parameter(torch.ones(dim))
    self.register_buffer('running_mean', torch.zeros(dim))
    self.register_buffer('running_var', torch.ones(dim))
    self.momentum, self.eps = momentum, eps

  def forward(self, x, stats=None):
    x = x.float()
    if stats is None and self.training:
      mean, var = x.mean(0), x.var(0, unbiased=False)
      with torch.no_grad():
        n = x.shape[0]
        self.running_mean.lerp_(mean, self.momentum)
        self.running_var.lerp_(var * n / max(n - 1, 1), self.momentum)
    elif stats is None:
      mean, var = self.running_mean, self.running_var
    else:
      mean, var = stats
    return (x - mean) * torch.rsqrt(var + self.eps) * self.weight, (mean, var)


class ReIDHead(nn.Module):

  def __init__(self, dim, num_classes):
    super().__init__()
    self.bnneck = BNNeck(dim)
    self.classifier = nn.Linear(dim, num_classes, bias=False)
    nn.init.normal_(self.classifier.weight, std=0.001)

  def forward(self, feat, stats=None):
    bn_feat, stats = self.bnneck(feat, stats)
    return bn_feat, self.classifier(bn_feat), stats


class OGFRReference(nn.Module):

  def __init__(self, args):
    super().__init__()
    dim, depth, heads = VIT_SIZES[args.size]
    grid = ((args.height - args.patch) // args.stride + 1,
            (args.width - args.patch) // args.stride + 1)
    self.depth, self.grid = depth, grid
    self.layer = depth + args.fepm_layer if args.fepm_layer < 0 else args.fepm_layer
    if not 0 <= self.layer < depth:
      raise ValueError(f'--fepm-layer={args.fepm_layer} is outside the {depth} blocks')
    self.teacher = ReIDViT(dim, depth, heads, grid, args)
    self.student = ReIDViT(dim, depth, heads, grid, args)
    self.teacher_head = ReIDHead(dim, args.num_classes)
    self.student_head = ReIDHead(dim, args.num_classes)
    self.pattern_embed = nn.Parameter(
        nn.init.trunc_normal_(torch.empty(args.num_patterns, dim), std=0.02))
    self.pattern_head = nn.Linear(dim, args.num_patterns)
    self.replace_token = nn.Parameter(nn.init.trunc_normal_(torch.empty(dim), std=0.02))
    self.agent = nn.Sequential(nn.LayerNorm(dim, eps=1e-6), nn.Linear(dim, args.agent_hidden),
                               nn.GELU(), nn.Linear(args.agent_hidden, 1))
    nn.init.constant_(self.agent[3].bias, args.prior_logit)

  def replace(self, tokens, mask, pos):
    fill = (self.replace_token + pos).to(tokens.dtype)
    patches = torch.where(mask[..., None], fill, tokens[:, 1:])
    return torch.cat([tokens[:, :1], patches], dim=1)

  def teacher_forward(self, image, camid, pid):
    t, layer, b = self.teacher, self.layer, image.shape[0]
    mid = t.run_blocks(t.embed(image, camid), 0, layer)
    with _no_autocast(image):
      scores = self.agent(mid[:, 1:].detach().float())[..., 0]
    probs = torch.sigmoid(scores)
    mask = torch.rand_like(probs) < probs.detach()
    greedy = scores.detach() > 0
    log_on, log_off = F.logsigmoid(scores), F.logsigmoid(-scores)
    logp = torch.where(mask, log_on, log_off).sum(-1)
    entropy = -(probs * log_on + (1 - probs) * log_off).sum(-1)
    pos = t.vit.pos_embed[:, 1:]
    out = t.norm(t.run_blocks(self.replace(mid, mask, pos), layer, self.depth))
    with _no_autocast(image):
      feat = out[:, 0].float()
      bn_feat, logits, stats = self.teacher_head(feat)
    # The three reward passes as one batch; no stochastic depth (the reward is a difference of
    # log-probabilities), no graph, and the BN statistics of the real teacher batch.
    with torch.no_grad():
      frozen = mid.detach()
      rows = torch.cat([self.replace(frozen, mask, pos), frozen,
                        self.replace(frozen, greedy, pos)])
      with _eval_mode(t.vit.blocks):
        reward_out = t.norm(t.run_blocks(rows, layer, self.depth))
      with _no_autocast(image):
        _, reward_logits, _ = self.teacher_head(
            reward_out[:, 0].float(), tuple(s.detach() for s in stats))
        lp = F.log_softmax(reward_logits, -1).gather(1, pid.repeat(3)[:, None])[:, 0]
    lp = lp.view(3, b)
    return {'feat': feat, 'bn_feat': bn_feat, 'logits': logits}, {
        'mask': mask, 'greedy': greedy, 'logp': logp, 'entropy': entropy,
        'lp_sampled': lp[0], 'lp_clean': lp[1], 'lp_greedy': lp[2]}

  def student_forward(self, occluded, camid, pattern):
    s = self.student
    out = s.norm(s.run_blocks(s.embed(occluded, camid, self.pattern_embed[pattern]), 0,
                              self.depth))
    with _no_autocast(occluded):
      feat = out[:, 0].float()
      bn_feat, logits, _ = self.student_head(feat)
      pattern_logits = self.pattern_head(bn_feat)
    return {'feat': feat, 'bn_feat': bn_feat, 'logits': logits,
            'pattern_logits': pattern_logits}


@contextlib.contextmanager
def _no_autocast(like):
  """Heads, agent and losses run in float32 whatever the backbone's autocast says."""
  with torch.autocast(like.device.type, enabled=False):
    yield


@contextlib.contextmanager
def _eval_mode(module):
  module.eval()
  try:
    yield
  finally:
    module.train()


# --- losses -----------------------------------------------------------------------------------


def triplet_soft_margin(feat, pid):
  """Batch-hard triplet with soft margin on pre-BN features (ogfr_jax.losses.triplet_loss)."""
  sq = (feat * feat).sum(-1)
  dist = (sq[:, None] + sq[None, :] - 2.0 * feat @ feat.T).clamp_min(1e-12).sqrt()
  eye = torch.eye(feat.shape[0], dtype=torch.bool, device=feat.device)
  dist = dist.masked_fill(eye, 0.0)
  same = pid[:, None] == pid[None, :]
  d_ap = dist.masked_fill(~same, 0.0).amax(1)
  d_an = dist.masked_fill(same, float('inf')).amin(1)
  valid = (~same).any(1)
  per_anchor = F.softplus(d_ap - torch.where(valid, d_an, torch.zeros_like(d_an)))
  return (per_anchor * valid).sum() / valid.sum().clamp_min(1)


def ogfr_loss(teacher, agent, student, batch, eta=0.1, temperature=4.0, entropy_weight=0.01,
              pattern_weight=0.1):
  pid = batch['pid']
  total = F.cross_entropy(student['logits'], pid) + triplet_soft_margin(student['feat'], pid)
  total = total + pattern_weight * F.cross_entropy(student['pattern_logits'], batch['pattern'])
  total = total + F.cross_entropy(teacher['logits'], pid) + triplet_soft_margin(
      teacher['feat'], pid)
  total = total + (1 - F.cosine_similarity(student['bn_feat'], teacher['bn_feat'].detach(),
                                           dim=-1, eps=1e-12)).mean()
  t_logp = F.log_softmax(teacher['logits'].detach() / temperature, -1)
  s_logp = F.log_softmax(student['logits'] / temperature, -1)
  total = total + (t_logp.exp() * (t_logp - s_logp)).sum(-1).mean() * temperature ** 2
  rate = agent['mask'].float().mean(-1)
  reward = agent['lp_sampled'] - agent['lp_clean'] - eta * rate
  greedy_reward = agent['lp_greedy'] - agent['lp_clean'] - eta * agent['greedy'].float().mean(-1)
  advantage = (reward - greedy_reward).detach()
  total = total - (advantage * agent['logp']).mean() - entropy_weight * agent['entropy'].mean()
  return total


# --- optimisation -----------------------------------------------------------------------------


def param_groups(model, args):
  """The TransReID groups of ogfr_jax/optim.py: weights (decay), biases (2x lr, no decay),
  norms and embeddings (no decay); the agent gets its own Adam."""
  groups = {'weights': [], 'bias': [], 'no_decay': [], 'agent': []}
  for name, param in model.named_parameters():
    parts = name.split('.')
    if parts[0] == 'agent':
      groups['agent'].append(param)
    elif (any('norm' in p or p == 'bnneck' for p in parts[:-1])
          or any(e in parts[-1] for e in EMBED_NAMES)):
      groups['no_decay'].append(param)
    elif parts[-1] == 'bias':
      groups['bias'].append(param)
    else:
      groups['weights'].append(param)
  backbone = [{'params': groups['weights'], 'weight_decay': args.weight_decay},
              {'params': groups['bias'], 'lr': 2 * args.lr, 'weight_decay': 0.0},
              {'params': groups['no_decay'], 'weight_decay': 0.0}]
  if args.optimizer == 'sgd':
    main = torch.optim.SGD(backbone, lr=args.lr, momentum=0.9)
  else:
    main = torch.optim.AdamW(backbone, lr=args.lr)
  return main, torch.optim.Adam(groups['agent'], lr=1e-4)


def grad_norm(params):
  grads = [p.grad for p in params if p.grad is not None]
  return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))


def random_batch(args, device, generator):
  b, k = args.batch, args.images_per_id
  shape = (b, 3, args.height, args.width)
  pid = torch.arange(b // k).repeat_interleave(k) % args.num_classes
  return {
      'image': torch.randn(shape, generator=generator).to(device),
      'occluded': torch.randn(shape, generator=generator).to(device),
      'pattern': torch.randint(0, args.num_patterns, (b,), generator=generator).to(device),
      'pid': pid.to(device),
      'camid': torch.randint(0, args.num_cameras, (b,), generator=generator).to(device),
  }


def train_step(model, optimizers, batch, amp: bool):
  for opt in optimizers:
    opt.zero_grad(set_to_none=True)
  device = batch['image'].device.type
  with torch.autocast(device, dtype=torch.bfloat16, enabled=amp):
    teacher, agent = model.teacher_forward(batch['image'], batch['camid'], batch['pid'])
    student = model.student_forward(batch['occluded'], batch['camid'], batch['pattern'])
  loss = ogfr_loss(teacher, agent, student, batch)
  loss.backward()
  norm = grad_norm(model.parameters())
  for opt in optimizers:
    opt.step()
  return loss.detach(), norm


@contextlib.contextmanager
def _unfused_attention(model):
  """timm's explicit attention matmuls, which the FLOP counter sees on every device."""
  attns = [m for m in model.modules() if hasattr(m, 'fused_attn')]
  saved = [a.fused_attn for a in attns]
  for a in attns:
    a.fused_attn = False
  try:
    yield
  finally:
    for a, s in zip(attns, saved):
      a.fused_attn = s


def count_step_flops(model, optimizers, batch, amp: bool) -> int:
  from torch.utils.flop_counter import FlopCounterMode  # pylint: disable=import-outside-toplevel
  with _unfused_attention(model), FlopCounterMode(display=False) as counter:
    train_step(model, optimizers, batch, amp)
  return int(counter.get_total_flops())


def main(argv=None) -> dict:
  args = parse_args(argv)
  if args.batch % args.images_per_id:
    raise SystemExit(f'--batch={args.batch} must be a multiple of --images-per-id='
                     f'{args.images_per_id}')
  if args.lr is None:
    args.lr = 0.008 * args.batch / 64  # the recipe's linear scaling (ogfr_jax/optim.py)
  torch.set_num_threads(args.threads or os.cpu_count())
  device = torch.device('cuda' if args.device == 'auto' and torch.cuda.is_available()
                        else ('cpu' if args.device == 'auto' else args.device))
  torch.manual_seed(args.seed)
  model = OGFRReference(args).to(device).train()
  optimizers = param_groups(model, args)
  batch = random_batch(args, device, torch.Generator().manual_seed(args.seed))

  def sync():
    if device.type == 'cuda':
      torch.cuda.synchronize(device)

  # The counted step runs the unfused attention under the counter's dispatch hooks, so it is
  # an extra untimed step, before the warm-up steps that prime the timed path.
  flops = None if args.no_flops else count_step_flops(model, optimizers, batch, args.amp)
  for _ in range(args.warmup):
    train_step(model, optimizers, batch, args.amp)
  sync()
  if device.type == 'cuda':
    torch.cuda.reset_peak_memory_stats(device)
  times = []
  for _ in range(args.repeats):
    start = time.perf_counter()
    for _ in range(args.steps):
      loss, norm = train_step(model, optimizers, batch, args.amp)
    sync()
    times.append((time.perf_counter() - start) / args.steps)
  loss, norm = float(loss), float(norm)
  if not (np.isfinite(loss) and np.isfinite(norm)):
    raise SystemExit(f'non-finite loss {loss} or gradient norm {norm} in the reference step')

  dim, depth, heads = VIT_SIZES[args.size]
  if device.type == 'cuda':
    peak, source = torch.cuda.max_memory_allocated(device), 'torch.cuda.max_memory_allocated'
    device_name = torch.cuda.get_device_name(device)
  else:
    peak, source = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, 'process_peak_rss'
    device_name = f'cpu ({platform.processor() or platform.machine()})'
  median = float(np.median(times))
  result = {
      'impl': 'torch', 'torch_version': torch.__version__, 'timm_version': timm.__version__,
      'device': device_name, 'threads': torch.get_num_threads(),
      'omp_wait_policy': os.environ.get('OMP_WAIT_POLICY'), 'amp': args.amp,
      'size': args.size, 'dim': dim, 'depth': depth, 'heads': heads,
      'tokens': 1 + model.grid[0] * model.grid[1], 'batch': args.batch,
      'params': sum(p.numel() for p in model.parameters()),
      'steps': args.steps, 'repeats': args.repeats, 'warmup': args.warmup,
      'step_s': {'median': median, 'min': float(np.min(times)), 'max': float(np.max(times)),
                 'all': [float(t) for t in times]},
      'images_per_s': args.batch / median,
      'flops_per_step': flops,
      'flops_counter': 'torch.utils.flop_counter (matmul, conv, attention)',
      'peak_memory_bytes': int(peak), 'peak_memory_source': source,
      'loss': loss,
  }
  print(json.dumps(result))
  return result


if __name__ == '__main__':
  main()
