"""OGFR models: the ReID ViT backbone (`vit`), the purification agent and token replacement
(`fepm`), the teacher (`teacher`), the occlusion-aware student (`student`), their composition
(`ogfr`), and the one reader of the config's model sections (`build`)."""

from ogfr_jax.models.build import backbone_names
from ogfr_jax.models.build import build_model
from ogfr_jax.models.build import fepm_layer
from ogfr_jax.models.build import token_grid
from ogfr_jax.models.ogfr import OGFR
from ogfr_jax.models.vit import resize_pos_embed

__all__ = ['OGFR', 'backbone_names', 'build_model', 'fepm_layer', 'resize_pos_embed',
           'token_grid']
