"""OGFR trained on Market-1501, evaluated on Occluded-REID (the standard cross-domain protocol:
Occluded-REID has no training split).

Command:
  python -m ogfr_jax.main --config configs/occluded_reid.py \
      --config.dataset.root=/data/Market-1501-v15.09.15 \
      --config.dataset.test_root=/data/Occluded_REID \
      --config.init_from=/weights/jx_vit_base_p16_224-80ecf9dd.pth --workdir runs/occluded_reid

OGFR's published Occluded-REID figure is not known to us; compare against the Market-1501-trained
baselines of the occluded-ReID literature.

Weights and recipe: ImageNet-21k + 1k ViT-B/16 through --config.init_from, from
jx_vit_base_p16_224-80ecf9dd.pth (TransReID's), timm's
vit_base_patch16_224.augreg2_in21k_ft_in1k safetensors or the others in README, "Real
datasets"; TransReID's recipe with the exceptions that config_defaults.transreid_recipe states.

Cameras: the test cameras are not Market-1501's, so test images get the mean camera
embedding (eval.unseen_camera, explained in config_defaults). results.json has rank3 beside
rank1 (Partial-REID and Partial-iLIDS are reported as rank-1 / rank-3).

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
  c.dataset.name = 'market1501'
  c.dataset.test_name = 'occluded_reid'
  c.model.dtype = 'auto'  # bfloat16 on GPU/TPU, float32 on CPU (ogfr_jax/precision.py)
  c.model.attention_impl = 'auto'  # cuDNN fused attention on NVIDIA GPUs
  if arg.runlocal:
    config_defaults.shrink_for_local_run(c)
  return c
