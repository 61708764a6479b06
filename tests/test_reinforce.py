"""REINFORCE against the exact policy gradient on problems small enough to enumerate.

For a policy over masks of N tokens and a fixed, arbitrary reward table R(mask), the exact
gradient of J = E_{a ~ pi}[R(a)] is jax.grad of the enumerated expectation, written here
independently of the code under test. The estimate uses the project's own sampler, log-probability
and `reinforce_loss`, differentiated by jax.grad exactly as in training (gradient of -loss).
Agreement: every coordinate within 4 standard errors of the Monte-Carlo mean, plus a relative
error and cosine check. The same check rejects wrong estimators (sign flipped, baseline without
stop_gradient, a bounded policy scored as if it were unbounded), so it can fail.
"""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from ogfr_jax import losses
from ogfr_jax.models import fepm

N = 4
MASKS = np.array(list(itertools.product([0, 1], repeat=N)), bool)  # [16, N]
REWARDS = np.random.default_rng(0).normal(size=len(MASKS)).astype(np.float32) + 1.0
THETA = jnp.array([0.8, -0.5, 0.1, -1.2], jnp.float32)
NUM_SAMPLES = 30000
# The bounds of the training recipe (config_defaults: fepm.prob_bounds).
BOUNDS = (0.02, 0.6)
# The greedy threshold only decides `Selection.greedy_mask`, which a sampled action never reads.
THRESHOLD = jnp.float32(0.0)


def mask_index(mask):
  """Row of MASKS (and REWARDS) for a boolean mask [..., N]."""
  return jnp.sum(mask.astype(jnp.int32) * (2 ** jnp.arange(N - 1, -1, -1)), axis=-1)


def agreement(samples, exact, z=4.0, max_rel=0.1, min_cos=0.99):
  """(passes, details) for per-sample gradient estimates [n, P] against the exact [P]."""
  samples, exact = np.asarray(samples, np.float64), np.asarray(exact, np.float64)
  n = samples.shape[0]
  mean = samples.mean(0)
  se = samples.std(0, ddof=1) / np.sqrt(n)
  within = np.abs(mean - exact) <= z * se + 1e-7
  rel = np.linalg.norm(mean - exact) / np.linalg.norm(exact)
  cos = mean @ exact / (np.linalg.norm(mean) * np.linalg.norm(exact))
  ok = bool(within.all() and rel < max_rel and cos > min_cos)
  return ok, {'rel': rel, 'cos': cos, 'worst_z': float(np.max(np.abs(mean - exact) / (se + 1e-12)))}


# --- Bernoulli policy with a logits vector --------------------------------------------------


def policy_probs(theta, bounds=fepm.UNBOUNDED):
  """p_i = lo + (hi - lo) sigmoid(theta_i), written out here independently of fepm."""
  lo, hi = bounds
  return lo + (hi - lo) * jax.nn.sigmoid(theta)


def exact_bernoulli_objective(theta, bounds=fepm.UNBOUNDED):
  p = policy_probs(theta, bounds)
  probs = jnp.prod(jnp.where(MASKS, p, 1 - p), axis=-1)
  return jnp.sum(probs * REWARDS)


def without_stop_gradient(logp, reward, baseline, entropy, entropy_weight):
  """reinforce_loss with the stop-gradient on (reward - baseline) left out: a bug to catch."""
  return -jnp.mean((reward - baseline) * logp) - entropy_weight * jnp.mean(entropy)


@functools.partial(jax.jit, static_argnames=('leaky', 'bounds', 'unbounded_log_prob'))
def bernoulli_sample_grads(theta, keys, baseline, critic_weight=0.0, leaky=False,
                           bounds=fepm.UNBOUNDED, unbounded_log_prob=False):
  """Per-sample gradients of J from one-sample REINFORCE, [n, N].

  The baseline is `baseline + critic_weight * sum(sigmoid(theta))`: with critic_weight != 0 it
  depends on the parameters, like a learned critic would. `unbounded_log_prob`: the action is
  drawn from the bounded policy but scored with the plain sigmoid, a bug to catch.
  """
  loss_fn = without_stop_gradient if leaky else losses.reinforce_loss

  def one(key):
    def neg_loss(th):
      sel = fepm.select(th[None], key=key, threshold=THRESHOLD, bounds=bounds)
      logp = (fepm.bernoulli_log_prob(th[None], sel.mask) if unbounded_log_prob
              else sel.log_prob)
      reward = jnp.asarray(REWARDS)[mask_index(sel.mask)]
      b = baseline + critic_weight * jnp.sum(jax.nn.sigmoid(th))
      return -loss_fn(logp, reward, b, sel.entropy, 0.0)
    return jax.grad(neg_loss)(theta)

  return jax.vmap(one)(keys)


@pytest.mark.parametrize('bounds', [fepm.UNBOUNDED, BOUNDS])
def test_bernoulli_log_prob_and_entropy_are_exact(bounds):
  logp = jax.vmap(lambda m: fepm.bernoulli_log_prob(THETA, m, bounds))(jnp.asarray(MASKS))
  p = policy_probs(THETA, bounds)
  direct = jnp.prod(jnp.where(MASKS, p, 1 - p), axis=-1)
  np.testing.assert_allclose(np.exp(logp), direct, rtol=1e-5)
  np.testing.assert_allclose(np.exp(logp).sum(), 1.0, rtol=1e-5)
  np.testing.assert_allclose(fepm.bernoulli_entropy(THETA, bounds),
                             -np.sum(direct * np.log(direct)), rtol=1e-5)
  np.testing.assert_allclose(fepm.selection_probs(THETA, bounds), p, rtol=1e-6)


@pytest.mark.parametrize('bounds', [fepm.UNBOUNDED, BOUNDS])
def test_bernoulli_sampler_matches_its_probabilities(bounds):
  keys = jax.random.split(jax.random.PRNGKey(1), NUM_SAMPLES)
  masks = jax.vmap(lambda k: fepm.bernoulli_sample(k, THETA, bounds))(keys)
  freq = np.bincount(np.asarray(mask_index(masks)), minlength=16) / NUM_SAMPLES
  p = policy_probs(THETA, bounds)
  probs = np.asarray(jnp.prod(jnp.where(MASKS, p, 1 - p), axis=-1))
  assert np.all(np.abs(freq - probs) < 4 * np.sqrt(probs * (1 - probs) / NUM_SAMPLES) + 1e-4)


@pytest.mark.parametrize('baseline', [0.0, 0.8])
def test_reinforce_matches_exact_gradient_bernoulli(baseline):
  exact = jax.grad(exact_bernoulli_objective)(THETA)
  keys = jax.random.split(jax.random.PRNGKey(2), NUM_SAMPLES)
  grads = bernoulli_sample_grads(THETA, keys, baseline)
  ok, info = agreement(grads, exact)
  assert ok, info
  # One call of reinforce_loss over the whole batch gives the mean of the per-sample terms.
  def batch_neg_loss(th):
    sel = fepm.select(jnp.broadcast_to(th, (2000, N)), key=jax.random.PRNGKey(3),
                      threshold=THRESHOLD)
    reward = jnp.asarray(REWARDS)[mask_index(sel.mask)]
    return -losses.reinforce_loss(sel.log_prob, reward, baseline, sel.entropy, 0.0)
  batch_grad = jax.grad(batch_neg_loss)(THETA)
  sel = fepm.select(jnp.broadcast_to(THETA, (2000, N)), key=jax.random.PRNGKey(3),
                    threshold=THRESHOLD)
  adv = jnp.asarray(REWARDS)[mask_index(sel.mask)] - baseline
  score = np.asarray(sel.mask, np.float32) - np.asarray(jax.nn.sigmoid(THETA))  # d logp/d theta
  np.testing.assert_allclose(batch_grad, (np.asarray(adv)[:, None] * score).mean(0), rtol=1e-4,
                             atol=1e-6)


@pytest.mark.parametrize('baseline', [0.0, 0.8])
def test_reinforce_matches_exact_gradient_bounded(baseline):
  """The policy of the training recipe: p = lo + (hi - lo) sigmoid(theta)."""
  exact = jax.grad(exact_bernoulli_objective)(THETA, BOUNDS)
  keys = jax.random.split(jax.random.PRNGKey(13), NUM_SAMPLES)
  grads = bernoulli_sample_grads(THETA, keys, baseline, bounds=BOUNDS)
  ok, info = agreement(grads, exact)
  assert ok, info
  # Nor is it the unbounded policy's gradient: the bounds change the problem.
  assert not agreement(grads, jax.grad(exact_bernoulli_objective)(THETA))[0]


def test_check_detects_a_log_prob_that_ignores_the_bounds():
  """Actions drawn from the bounded policy but scored with the plain sigmoid bias the
  gradient; the check catches it on the same samples on which the bounded log-probability
  passes."""
  exact = jax.grad(exact_bernoulli_objective)(THETA, BOUNDS)
  keys = jax.random.split(jax.random.PRNGKey(12), NUM_SAMPLES)
  ok, info = agreement(bernoulli_sample_grads(THETA, keys, 0.0, bounds=BOUNDS), exact)
  assert ok, info
  wrong = bernoulli_sample_grads(THETA, keys, 0.0, bounds=BOUNDS, unbounded_log_prob=True)
  assert not agreement(wrong, exact)[0]


def test_a_good_baseline_reduces_variance():
  keys = jax.random.split(jax.random.PRNGKey(4), NUM_SAMPLES)
  mean_reward = float(exact_bernoulli_objective(THETA))
  plain = np.asarray(bernoulli_sample_grads(THETA, keys, 0.0))
  centred = np.asarray(bernoulli_sample_grads(THETA, keys, mean_reward))
  assert centred.var(0).sum() < 0.7 * plain.var(0).sum()


def test_check_detects_wrong_estimators():
  exact = jax.grad(exact_bernoulli_objective)(THETA)
  keys = jax.random.split(jax.random.PRNGKey(5), NUM_SAMPLES)

  # Sign flipped (gradient of the loss taken as the gradient of J).
  flipped = -np.asarray(bernoulli_sample_grads(THETA, keys, 0.0))
  assert not agreement(flipped, exact)[0]

  # A baseline that depends on the parameters (a learned critic, say) is fine as long as it is
  # held constant: reinforce_loss stops its gradient. Without the stop-gradient it is biased.
  good = bernoulli_sample_grads(THETA, keys, 0.0, critic_weight=2.0)
  ok, info = agreement(good, exact)
  assert ok, info
  leaky = bernoulli_sample_grads(THETA, keys, 0.0, critic_weight=2.0, leaky=True)
  assert not agreement(leaky, exact)[0]


# --- a small network policy (the agent module itself) -----------------------------------------


def test_reinforce_matches_exact_gradient_for_the_agent_network():
  rng = np.random.default_rng(6)
  states = jnp.asarray(rng.normal(size=(3, N, 8)), jnp.float32)  # 3 images, N tokens, D = 8
  rewards = jnp.asarray(rng.normal(size=(3, len(MASKS))), jnp.float32)  # R_s(mask)
  agent = fepm.Agent(hidden=8, prior_logit=0.0)
  params = agent.init(jax.random.PRNGKey(7), states)['params']
  # Spread the initial logits so that the problem is not symmetric.
  params = jax.tree_util.tree_map(lambda x: x * 20.0 if x.ndim == 2 else x, params)
  flat, unravel = ravel_pytree(params)

  def exact_objective(v):
    p = policy_probs(agent.apply({'params': unravel(v)}, states), BOUNDS)  # [3, N]
    probs = jnp.prod(jnp.where(MASKS[None], p[:, None], 1 - p[:, None]), axis=-1)  # [3, 16]
    return jnp.mean(jnp.sum(probs * rewards, axis=-1))

  exact = jax.grad(exact_objective)(flat)
  assert np.linalg.norm(exact) > 1e-3

  def one(key):
    def neg_loss(v):
      logits = agent.apply({'params': unravel(v)}, states)
      sel = fepm.select(logits, key=key, threshold=THRESHOLD, bounds=BOUNDS)
      reward = rewards[jnp.arange(3), mask_index(sel.mask)]
      return -losses.reinforce_loss(sel.log_prob, reward, 0.5, sel.entropy, 0.0)
    return jax.grad(neg_loss)(flat)

  keys = jax.random.split(jax.random.PRNGKey(8), NUM_SAMPLES)
  grads = jax.jit(jax.vmap(one))(keys)
  ok, info = agreement(grads, exact, max_rel=0.15, min_cos=0.98)
  assert ok, info
  assert not agreement(-np.asarray(grads), exact)[0]
