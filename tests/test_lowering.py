"""The real recipe's accelerator programs, lowered on this CPU with jax.export.

configs/occluded_duke.py (runlocal: tiny ViT, the recipe's 256x128 input at stride 11, 243
tokens) has model.dtype='auto' and model.attention_impl='auto'. Resolved for `cuda` it is
bfloat16 with cuDNN attention, for `tpu` bfloat16 with XLA attention, for `cpu` float32 with
XLA attention. The train step (forward, backward, optimizer update in the accelerators' select
form) and the evaluation's feature extraction are exported for cuda and tpu, so every path
that only an accelerator runs is at least lowered here.

cuDNN on a CPU host: jax's cuDNN attention asks the installed cuDNN for its version while it
traces (`check_cudnn_version`), and a CPU jaxlib has no CUDA libraries, so tracing raises
"cuDNN is not detected" before any lowering. The version only gates checks for GPUs this
host cannot describe (compute capability 10.3, multi-head latent attention), so the tests
answer that query with a cuDNN 9 version; everything after it (the shape checks, the
custom calls `__cudnn$fmhaSoftmax` / `__cudnn$fmhaSoftmaxBackward` with their backend
configs) is jax's own lowering for cuda. What no CPU can check is the kernel's numerics;
the padding around it (an odd token count gets one masked token) is checked against plain
attention through XLA (test_padded_attention_equals_plain_attention).
"""

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.cudnn import fused_attention_stablehlo

from ogfr_jax import bench
from ogfr_jax import evaluate
from ogfr_jax import parallel
from ogfr_jax import precision
from ogfr_jax.models import vit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDNN_CALLS = ('__cudnn$fmhaSoftmax', '__cudnn$fmhaSoftmaxBackward')
CUDNN_VERSION = 90800


@pytest.fixture
def cudnn_version(monkeypatch):
  monkeypatch.setattr(fused_attention_stablehlo, 'check_cudnn_version', lambda: CUDNN_VERSION)


def raw_recipe():
  config = bench.load_config_file(os.path.join(ROOT, 'configs', 'occluded_duke.py') +
                                  ':runlocal')
  assert config.model.dtype == 'auto' and config.model.attention_impl == 'auto'
  return config


def recipe(platform):
  return precision.resolve(raw_recipe(), platform)


def exported_text(fn, args, platform):
  checks = [jax.export.DisabledSafetyCheck.custom_call(name) for name in CUDNN_CALLS]
  exp = jax.export.export(fn, platforms=(platform,), disabled_checks=checks)(*args)
  assert exp.platforms == (platform,)
  return exp, exp.mlir_module()


def dot_types(text):
  """Element types of every dot_general's result in a StableHLO module."""
  return set(re.findall(r'stablehlo\.dot_general.*-> tensor<[0-9x]*x?(\w+)>', text))


def test_auto_resolves_per_platform():
  for platform, dtype, attention in (('cpu', 'float32', 'xla'), ('cuda', 'bfloat16', 'cudnn'),
                                     ('gpu', 'bfloat16', 'cudnn'), ('tpu', 'bfloat16', 'xla')):
    m = recipe(platform).model
    assert (m.dtype, m.attention_impl) == (dtype, attention), platform
  # An explicit choice overrides 'auto' on every platform.
  config = raw_recipe()
  config.model.dtype, config.model.attention_impl = 'float32', 'xla'
  assert precision.resolve(config, 'cuda') is config
  # cuDNN needs a half-precision dtype: float32 on a GPU keeps XLA's attention.
  config = raw_recipe()
  config.model.dtype = 'float32'
  assert precision.resolve(config, 'cuda').model.attention_impl == 'xla'


def test_header_line_names_the_choices():
  config = raw_recipe()
  assert precision.describe(config, 'cuda') == (
      'bfloat16 compute (auto), float32 parameters and optimizer state; attention cudnn (auto); '
      'remat none')
  assert precision.describe(config, 'cpu').startswith('float32 compute (auto), ')
  config.model.dtype, config.model.remat = 'bfloat16', 'block'
  assert precision.describe(config, 'tpu') == (
      'bfloat16 compute, float32 parameters and optimizer state; attention xla (auto); '
      'remat block')


def test_synthetic_config_is_not_auto():
  config = bench.load_config_file(os.path.join(ROOT, 'configs', 'synthetic.py'))
  assert (config.model.dtype, config.model.attention_impl) == ('float32', 'xla')
  assert precision.resolve(config, 'cuda') is config


@pytest.mark.parametrize('platform', ['cuda', 'tpu'])
def test_train_step_and_evaluation_lower_for_accelerators(platform, cudnn_version):
  config = recipe(platform)
  # One device: over several, jax partitions cuDNN attention with a Python callback
  # (custom_partitioning), which jax.export cannot serialise; the sharded program is lowered
  # without export in test_sharded_train_step_lowers_for_accelerators.
  mesh = parallel.make_mesh(config.mesh, jax.devices()[:1])
  step, state, batch, model = bench.abstract_train_step(config, 7, 8, mesh, platform=platform)
  exp, text = exported_text(step, (state, batch), platform)
  cudnn = [name for name in CUDNN_CALLS if f'@{name}(' in text]
  assert cudnn == (list(CUDNN_CALLS) if platform == 'cuda' else []), cudnn
  # The products run in bfloat16; parameters and optimizer state arrive and leave as float32.
  assert 'bf16' in dot_types(text), dot_types(text)
  floats = {a.dtype for a in exp.in_avals + exp.out_avals if jnp.issubdtype(a.dtype, jnp.floating)}
  assert floats == {np.dtype(np.float32)}, floats
  # The optimizer update is the select form, not the CPU's conditional.
  assert 'stablehlo.case' not in text and 'stablehlo.if' not in text

  extract = evaluate.make_extract_fn(model, config, mesh)
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  images = jax.ShapeDtypeStruct((16, config.input.height, config.input.width, 3), jnp.uint8)
  camids = jax.ShapeDtypeStruct((16,), jnp.int32)
  exp, text = exported_text(extract, (variables, images, camids), platform)
  assert ('@__cudnn$fmhaSoftmax(' in text) == (platform == 'cuda')
  assert '__cudnn$fmhaSoftmaxBackward' not in text
  assert 'bf16' in dot_types(text)
  assert exp.out_avals[0].dtype == jnp.float32


@pytest.mark.parametrize('platform', ['cuda', 'tpu'])
def test_sharded_train_step_lowers_for_accelerators(platform, cudnn_version):
  config = recipe(platform)
  mesh = parallel.make_mesh(config.mesh)
  assert mesh.size == len(jax.devices()) > 1
  step, state, batch, _ = bench.abstract_train_step(config, 7, 8, mesh, platform=platform)
  text = step.trace(state, batch).lower(lowering_platforms=(platform,)).as_text()
  # Over a mesh, each cuDNN attention call (forward or backward) is a partitioning call that
  # the compiler expands per device: as many as the one-device program has cuDNN calls.
  one = parallel.make_mesh(config.mesh, jax.devices()[:1])
  step1, state1, batch1, _ = bench.abstract_train_step(config, 7, 8, one, platform=platform)
  text1 = step1.trace(state1, batch1).lower(lowering_platforms=(platform,)).as_text()
  cudnn_calls = sum(text1.count(f'@{name}(') for name in CUDNN_CALLS)
  assert (cudnn_calls > 0) == (platform == 'cuda'), cudnn_calls
  assert text.count('@CustomSPMDPartitioning(') == cudnn_calls
  assert ('tensor<8x244x2x32xbf16>' in text) == (platform == 'cuda')
  assert 'bf16' in dot_types(text)


def test_cpu_lowering_of_the_recipe_stays_float32():
  config = recipe('cpu')
  mesh = parallel.make_mesh(config.mesh)
  step, state, batch, _ = bench.abstract_train_step(config, 7, 8, mesh)
  text = step.lower(state, batch).as_text()
  assert dot_types(text) == {'f32'}, dot_types(text)
  assert 'cudnn' not in text


def test_cudnn_refuses_odd_token_counts_when_differentiated(cudnn_version):
  """Why `vit.cudnn_attention` pads: jax's own cuDNN path refuses 243 tokens in training."""
  s = jax.ShapeDtypeStruct((2, 243, 2, 32), jnp.bfloat16)
  plain = lambda q, k, v: jax.nn.dot_product_attention(  # noqa: E731
      q, k, v, implementation='cudnn').astype(jnp.float32).sum()
  with pytest.raises(NotImplementedError, match='sequence length'):
    jax.export.export(jax.jit(jax.grad(plain)), platforms=('cuda',))(s, s, s)
  padded = lambda q, k, v: vit.cudnn_attention(q, k, v).astype(jnp.float32).sum()  # noqa: E731
  _, text = exported_text(jax.jit(jax.grad(padded)), (s, s, s), 'cuda')
  assert 'tensor<2x244x2x32xbf16>' in text and '\\22mask_type\\22: \\22PADDING\\22' in text


@pytest.mark.parametrize('tokens', [243, 244])
def test_padded_attention_equals_plain_attention(tokens):
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  q, k, v = (jax.random.normal(key, (2, tokens, 2, 32)) for key in keys[:3])
  weights = jax.random.normal(keys[3], (2, tokens, 2, 32))
  plain = lambda q, k, v: jax.nn.dot_product_attention(q, k, v)  # noqa: E731
  padded = lambda q, k, v: vit.cudnn_attention(q, k, v, implementation='xla')  # noqa: E731
  # The masked token adds an exact zero to each softmax sum; only the order of the float32
  # sums over `tokens` terms may differ: at most ~tokens * eps relative to the largest term.
  bound = lambda ref: tokens * np.finfo(np.float32).eps * float(jnp.max(jnp.abs(ref)))  # noqa: E731
  expected = plain(q, k, v)
  np.testing.assert_allclose(padded(q, k, v), expected, rtol=0, atol=bound(v))
  grads = [jax.grad(lambda *a, f=f: jnp.sum(f(*a) * weights), argnums=(0, 1, 2))(q, k, v)
           for f in (plain, padded)]
  for a, b in zip(*grads):
    np.testing.assert_allclose(b, a, rtol=0, atol=bound(a))
