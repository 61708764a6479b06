r"""Reference outputs of a timm ViT, for checking that our import and forward pass match it.

Runs in a separate environment with torch and timm (never needed by the package or its tests):

  python3 -m venv /tmp/timm_env
  /tmp/timm_env/bin/pip install torch==2.14.1 torchvision==0.29.1 timm safetensors numpy
  /tmp/timm_env/bin/python tools/make_parity_fixtures.py                       # the committed set
  /tmp/timm_env/bin/python tools/make_parity_fixtures.py --size base --out /tmp/parity_base --pth

It builds a timm `VisionTransformer` with random weights (every tensor random, biases and norm
parameters included, so that a wrong mapping of any of them shows), stored as if pretrained at
a square input, and records for each case the final tokens after the last norm
(`forward_features`) and the CLS feature (`forward_head(pre_logits=True)`):

  s16  the pretrained input size at stride = patch size (no resampling)
  s12  a ReID-shaped input with overlapping patches (stride 12) and the position embedding
       resampled to that grid with timm's `resample_abs_pos_embed` (bilinear,
       align_corners=False, no antialias: the TransReID convention); the model is built with
       img_size = grid * patch so that its pos_embed has the resampled size, its patch conv
       stride set to 12 and strict_img_size off, which is also how a timm user loads our export.

Files written to --out: vit_<size>.safetensors (the weights, with the classification head),
outputs.npz (per case: image_uint8, tokens, cls), manifest.json (sizes, cases, versions) and,
for the tiny set, torch_state_zip.pth / torch_state_legacy.pth / torch_state_expected.npz: a
small state dict (views, offsets, float16, bfloat16, int64, bool, a Parameter) saved in both
PyTorch formats, for the torch-free reader. Images are uint8; both sides turn them into floats
with `image_uint8.astype(float32) / 127.5 - 1` in numpy, so the inputs are bit-identical.
"""

from __future__ import annotations

import argparse
import collections
import json
import os

import numpy as np
import safetensors.torch
import timm
import torch
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer

SIZES = {
    # width, depth, heads, patch, mlp ratio, pretrained (square) input, cases
    'tiny': dict(width=64, depth=2, heads=2, patch=16, mlp_ratio=4.0, pretrained=64,
                 classes=10, batch=2,
                 cases={'s16': dict(height=64, width=64, stride=16),
                        's12': dict(height=64, width=48, stride=12)}),
    'base': dict(width=768, depth=12, heads=12, patch=16, mlp_ratio=4.0, pretrained=224,
                 classes=1000, batch=2,
                 cases={'s16': dict(height=224, width=224, stride=16),
                        's12': dict(height=256, width=128, stride=12)}),
}


def to_float(image_uint8: np.ndarray) -> np.ndarray:
  return image_uint8.astype(np.float32) / np.float32(127.5) - np.float32(1.0)


def grid_of(height: int, width: int, patch: int, stride: int) -> tuple[int, int]:
  return (height - patch) // stride + 1, (width - patch) // stride + 1


def build(spec: dict, img_size) -> VisionTransformer:
  return VisionTransformer(
      img_size=img_size, patch_size=spec['patch'], embed_dim=spec['width'], depth=spec['depth'],
      num_heads=spec['heads'], mlp_ratio=spec['mlp_ratio'], qkv_bias=True,
      num_classes=spec['classes'], global_pool='token', class_token=True).eval()


def randomise(model: torch.nn.Module, seed: int) -> None:
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      if 'norm' in name and name.endswith('weight'):
        p.copy_(1.0 + 0.1 * noise)
      else:
        p.copy_(0.05 * noise)


def run_case(spec: dict, state: dict, case: dict, image_uint8: np.ndarray):
  p, s = spec['patch'], case['stride']
  pre = spec['pretrained'] // p
  gh, gw = grid_of(case['height'], case['width'], p, s)
  model = build(spec, (gh * p, gw * p))
  state = dict(state)
  state['pos_embed'] = resample_abs_pos_embed(
      state['pos_embed'], new_size=(gh, gw), old_size=(pre, pre), num_prefix_tokens=1,
      interpolation='bilinear', antialias=False, align_corners=False)
  model.load_state_dict(state)
  model.patch_embed.proj.stride = (s, s)
  model.patch_embed.strict_img_size = False
  x = torch.from_numpy(to_float(image_uint8)).permute(0, 3, 1, 2).contiguous()
  with torch.no_grad():
    tokens = model.forward_features(x)
    cls = model.forward_head(tokens, pre_logits=True)
  assert tokens.shape[1] == 1 + gh * gw, tokens.shape
  return tokens.numpy(), cls.numpy(), (gh, gw)


def write_torch_reader_fixtures(out: str) -> None:
  """A small state dict with the tensor layouts a real checkpoint can hold, in both formats."""
  a = torch.arange(12, dtype=torch.float32).reshape(3, 4) / 7
  sd = collections.OrderedDict(
      a=a, at=a.t(), tail=a[1:], h=torch.linspace(-2, 2, 5).half(),
      bf=torch.tensor([1.5, -2.25, 3.0, 1e-3]).bfloat16(), i=torch.tensor([1, -2, 3 << 40]),
      flag=torch.tensor([True, False]), param=torch.nn.Parameter(torch.full((2,), 0.5)))
  wrapped = {'state_dict': sd, 'epoch': 7}
  torch.save(wrapped, os.path.join(out, 'torch_state_zip.pth'))
  torch.save(wrapped, os.path.join(out, 'torch_state_legacy.pth'),
             _use_new_zipfile_serialization=False)
  np.savez(os.path.join(out, 'torch_state_expected.npz'),
           **{k: (v.detach().float() if v.dtype == torch.bfloat16 else v.detach()).numpy()
              for k, v in sd.items()})


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--size', choices=sorted(SIZES), default='tiny')
  parser.add_argument('--out', default=os.path.join(os.path.dirname(__file__), '..', 'tests',
                                                    'fixtures', 'parity'))
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--pth', action='store_true',
                      help='also save the weights as a .pth (torch zip format)')
  args = parser.parse_args()
  torch.manual_seed(args.seed)
  torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
  spec = SIZES[args.size]
  os.makedirs(args.out, exist_ok=True)

  model = build(spec, spec['pretrained'])
  randomise(model, args.seed)
  state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
  weights = f'vit_{args.size}.safetensors'
  safetensors.torch.save_file(state, os.path.join(args.out, weights))
  if args.pth:
    torch.save(state, os.path.join(args.out, f'vit_{args.size}.pth'))

  rng = np.random.default_rng(args.seed)
  outputs, cases = {}, {}
  for name, case in spec['cases'].items():
    image = rng.integers(0, 256, (spec['batch'], case['height'], case['width'], 3), np.uint8)
    tokens, cls, grid = run_case(spec, state, case, image)
    outputs[f'{name}/image_uint8'] = image
    outputs[f'{name}/tokens'] = tokens
    outputs[f'{name}/cls'] = cls
    cases[name] = dict(case, grid=list(grid))
  np.savez(os.path.join(args.out, 'outputs.npz'), **outputs)
  manifest = {
      'weights': weights, 'width': spec['width'], 'depth': spec['depth'],
      'heads': spec['heads'], 'patch': spec['patch'], 'mlp_ratio': spec['mlp_ratio'],
      'pretrained_grid': [spec['pretrained'] // spec['patch']] * 2, 'classes': spec['classes'],
      'cases': cases, 'seed': args.seed,
      'versions': {'torch': torch.__version__, 'timm': timm.__version__},
  }
  with open(os.path.join(args.out, 'manifest.json'), 'w') as f:
    json.dump(manifest, f, indent=2, sort_keys=True)
  if args.size == 'tiny':
    write_torch_reader_fixtures(args.out)
  total = sum(os.path.getsize(os.path.join(args.out, n)) for n in os.listdir(args.out))
  print(f'wrote {sorted(os.listdir(args.out))} to {args.out} ({total / 1e6:.2f} MB)')


if __name__ == '__main__':
  main()
