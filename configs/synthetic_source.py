"""Source-domain pretraining for the synthetic benchmark: the ImageNet stage of the real recipe.

What: on real data every OGFR row starts from an ImageNet-pretrained ViT. No such weights exist
for the tiny ViT of configs/synthetic.py, so this config trains one on a *different* synthetic
world (another generator seed: other identities, cameras and backgrounds; 400 identities),
student only, with no occlusion synthesis. Its student is then exported and loaded by the
rows that start from it:
  python -m ogfr_jax.main --config configs/synthetic_source.py --workdir runs/source
  python -m ogfr_jax.tools.convert --export_student runs/source --output runs/source.safetensors
  python -m ogfr_jax.main --config configs/synthetic.py --workdir runs/synthetic_pre \
      --config.init_from=runs/source.safetensors
`benchmarks/ablation_table.py --pretrain` runs these steps itself.

Command:
  python -m ogfr_jax.main --config configs/synthetic_source.py --workdir runs/source

Machine and wall time: the project's 2-core CPU VM, 6-8 min pinned to one core under heavy
load from other jobs, generating the 4,800-image source world included. Built once on the
first run of configs/synthetic.py (`init_from='synthetic_source'`, ogfr_jax/source_weights.py).

Expected: mAP 0.328 / rank-1 0.333 on its own test split (seed 0, 30 epochs, generator v3;
one seed only, docs/results.md "The teacher on the README recipe").

Args: `runlocal` for smoke tests.
"""


def get_config(arg=None):
  from ogfr_jax import config_defaults  # pylint: disable=g-import-not-at-top
  c = config_defaults.sibling_config(__file__, 'synthetic.py', arg)
  runlocal = 'runlocal' in str(arg or '')
  c.synthetic.seed = 1000  # another world: identities, cameras and backgrounds all differ
  c.init_from = ''  # the source run itself starts from scratch
  if not runlocal:
    c.synthetic.num_train_ids = 400
    c.train.epochs = 30
    c.train.eval_every_epochs = 30
  # Student only, holistic images: what an ImageNet/ReID backbone would have seen.
  c.occlusion.enabled = False
  c.model.teacher = False
  c.fepm.enabled = False
  c.model.pattern_embed = False
  return c
