"""Optimizers: the TransReID parameter groups, a warm-up + cosine schedule, and the agent's
own optimizer, combined with optax.multi_transform.

Groups (by parameter path):
  agent      every parameter under a module named 'agent' (FEPM policy): its own optimizer;
  no_decay   norm scales/biases and embeddings (cls, position, camera, pattern, replacement
             token) when config.optim.no_decay_norm_and_embed;
  bias       other biases: learning rate x bias_lr_factor (TransReID uses 2);
  weights    everything else.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import traverse_util

_EMBED_NAMES = ('cls_token', 'pos_embed', 'sie_embed', 'pattern_embed', 'replace_token')


def param_group(path: tuple[str, ...], cfg: ml_collections.ConfigDict) -> str:
  names = [p.lower() for p in path]
  if 'agent' in names:
    return 'agent'
  leaf = names[-1]
  in_norm = any('norm' in n or n == 'bnneck' for n in names[:-1])
  if cfg.no_decay_norm_and_embed and (in_norm or any(e in leaf for e in _EMBED_NAMES)):
    return 'no_decay'
  if leaf == 'bias':
    return 'bias'
  return 'weights'


def param_labels(params: Any, cfg: ml_collections.ConfigDict) -> Any:
  flat = traverse_util.flatten_dict(params)
  return traverse_util.unflatten_dict({k: param_group(k, cfg) for k in flat})


def lr_schedule(cfg: ml_collections.ConfigDict, global_batch: int, steps_per_epoch: int,
                total_steps: int, factor: float = 1.0) -> Callable[[Any], Any]:
  """The backbone's learning rate per step (`factor` x it for a group with its own peak).

  'warmup_cosine': linear warm-up from 1% to the peak, then cosine decay to lr_floor x peak,
  per step. 'transreid': `transreid_schedule`.
  """
  peak = cfg.lr * global_batch / cfg.base_batch_size
  if cfg.schedule == 'transreid':
    return transreid_schedule(peak, factor, cfg.lr_floor, cfg.warmup_epochs,
                              steps_per_epoch, total_steps)
  if cfg.schedule != 'warmup_cosine':
    raise ValueError(f'config.optim.schedule={cfg.schedule!r}: use warmup_cosine or transreid')
  warmup = min(int(cfg.warmup_epochs * steps_per_epoch), max(total_steps - 1, 0))
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.01 * peak, peak_value=peak, warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1), end_value=cfg.lr_floor * peak)
  if factor == 1.0:
    return schedule
  return lambda step: factor * schedule(step)


def transreid_schedule(peak: float, factor: float, floor: float, warmup_epochs: float,
                       steps_per_epoch: int, total_steps: int) -> Callable[[Any], Any]:
  """TransReID's schedule (timm CosineLRScheduler as its scheduler_factory sets it up),
  constant within an epoch: epoch e = 1, 2, ... (the first trains at e = 1) runs at

      e <  W:  init + e (factor * peak - init) / W               init  = 0.01 peak
      e >= W:  low + (factor * peak - low) (1 + cos(pi e / E)) / 2   low = floor x peak

  with W = warmup_epochs and E the run's epochs; the cosine counts from epoch 0, not from
  the end of the warm-up. A group with its own peak (the biases, factor 2) shares the start
  and the floor, as there.
  """
  init, low, top = 0.01 * peak, floor * peak, factor * peak
  epochs = max(total_steps / max(steps_per_epoch, 1), 1.0)

  def schedule(step):
    e = (jnp.asarray(step) // max(steps_per_epoch, 1) + 1).astype(jnp.float32)
    warm = init + e * (top - init) / max(warmup_epochs, 1e-9)
    cos = low + 0.5 * (top - low) * (1.0 + jnp.cos(jnp.pi * e / epochs))
    return jnp.where(e < warmup_epochs, warm, cos)

  return schedule


def agent_lr_schedule(cfg: ml_collections.ConfigDict, total_steps: int):
  """The agent's learning rate: cosine decay from `agent_lr` to 1% over the run. A scorer
  fitted to labels that change every batch ends wherever its last steps left it at a
  constant rate; decaying averages those steps out."""
  return optax.cosine_decay_schedule(cfg.agent_lr, max(total_steps, 1), alpha=0.01)


def _base(cfg, lr, weight_decay: float) -> optax.GradientTransformation:
  if cfg.name == 'sgd':
    # Coupled weight decay, as torch.optim.SGD does it in the TransReID recipe.
    parts = [optax.add_decayed_weights(weight_decay)] if weight_decay else []
    return optax.chain(*parts, optax.sgd(lr, momentum=cfg.momentum or None))
  if cfg.name == 'adamw':
    return optax.adamw(lr, weight_decay=weight_decay)
  raise ValueError(f'config.optim.name={cfg.name!r}: use sgd or adamw')


def make_optimizer(config: ml_collections.ConfigDict, global_batch: int,
                   steps_per_epoch: int, total_steps: int):
  """Returns (optax transformation, backbone learning-rate schedule)."""
  cfg = config.optim
  schedule = lr_schedule(cfg, global_batch, steps_per_epoch, total_steps)
  bias_schedule = lr_schedule(cfg, global_batch, steps_per_epoch, total_steps,
                              factor=cfg.bias_lr_factor)
  bias_decay = 0.0 if cfg.no_decay_norm_and_embed else cfg.weight_decay
  agent_tx = optax.adam(agent_lr_schedule(cfg, total_steps))
  transforms = {
      'weights': _base(cfg, schedule, cfg.weight_decay),
      'bias': _base(cfg, bias_schedule, bias_decay),
      'no_decay': _base(cfg, schedule, 0.0),
      'agent': agent_tx,
  }
  tx = optax.multi_transform(transforms, lambda params: param_labels(params, cfg))
  if cfg.grad_clip:
    tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip), tx)
  return tx, schedule


def group_sizes(params: Any, cfg: ml_collections.ConfigDict) -> dict[str, int]:
  """Parameter counts per group, for the start-of-run log."""
  out: dict[str, int] = {}
  for path, leaf in traverse_util.flatten_dict(params).items():
    group = param_group(path, cfg)
    out[group] = out.get(group, 0) + int(leaf.size)
  return out


def tree_size(tree: Any) -> int:
  return sum(int(x.size) for x in jax.tree_util.tree_leaves(tree))
