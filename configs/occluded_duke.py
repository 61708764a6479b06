"""OGFR on Occluded-Duke (ViT-B/16, overlapping stride 11, SIE, 120 epochs).

Command:
  python -m ogfr_jax.main --config configs/occluded_duke.py \
      --config.dataset.root=/data/Occluded_Duke \
      --config.init_from=/weights/jx_vit_base_p16_224-80ecf9dd.pth --workdir runs/occluded_duke

Published: OGFR 76.6 Rank-1 / 64.7 mAP (TransReID* 66.4 / 59.2, ViT baseline 61.1 / 53.8).

Weights and recipe: ImageNet-21k + 1k ViT-B/16 through --config.init_from, from
jx_vit_base_p16_224-80ecf9dd.pth (TransReID's), timm's
vit_base_patch16_224.augreg2_in21k_ft_in1k safetensors or the others in README, "Real
datasets"; TransReID's recipe with the exceptions that config_defaults.transreid_recipe states.

Machine and wall time: one GPU or TPU host; not run at full size yet. On CPU,
`benchmarks/rehearsal.py` measures every stage at this size and projects the run (README,
'What a run costs').

Expected: not measured: needs the dataset.

Args: `runlocal` shrinks the run to a few steps for a smoke test on one CPU.
"""

from ogfr_jax import config_defaults


def get_config(arg=None):
  arg = config_defaults.parse_arg(arg, runlocal=False)
  c = config_defaults.base_config()
  config_defaults.transreid_recipe(c)
  c.dataset.name = 'occluded_duke'
  c.model.stride = 11
  c.model.dtype = 'auto'  # bfloat16 on GPU/TPU, float32 on CPU (ogfr_jax/precision.py)
  c.model.attention_impl = 'auto'  # cuDNN fused attention on NVIDIA GPUs
  if arg.runlocal:
    config_defaults.shrink_for_local_run(c)
  return c
