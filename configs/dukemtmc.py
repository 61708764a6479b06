"""OGFR on DukeMTMC-reID (ViT-B/16, overlapping stride 12, SIE, 120 epochs).

Command:
  python -m ogfr_jax.main --config configs/dukemtmc.py \
      --config.dataset.root=/data/DukeMTMC-reID \
      --config.init_from=/weights/jx_vit_base_p16_224-80ecf9dd.pth --workdir runs/dukemtmc

Reference: TransReID* (ViT-B, stride 12, SIE + JPM) as reported by TransReID: 90.7 Rank-1 / 82.0 mAP. OGFR's DukeMTMC-reID figure is not known to us.

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
  c.dataset.name = 'dukemtmc'
  c.model.dtype = 'auto'  # bfloat16 on GPU/TPU, float32 on CPU (ogfr_jax/precision.py)
  c.model.attention_impl = 'auto'  # cuDNN fused attention on NVIDIA GPUs
  if arg.runlocal:
    config_defaults.shrink_for_local_run(c)
  return c
