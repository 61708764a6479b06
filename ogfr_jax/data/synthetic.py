"""The embedded occluded person re-identification benchmark, drawn procedurally.

No real dataset can be fetched where this project runs, yet the default job must train and be
scored on something with the structure of Occluded-Duke: identities seen by several cameras,
occluded queries against a mostly holistic gallery, and distractors. This module draws such a
benchmark in numpy (every shape is a mask computed from coordinate grids, so one image costs a
few dozen array operations) and writes it in the Market-1501 layout, so the ordinary reader
loads it:

  <root>/bounding_box_train/  query/  bounding_box_test/   PPPP_cCsS_FFFFFF_NN.jpg
  <root>/masks.npz     occluder masks and types of every occluded query / gallery / train image
  <root>/clutter.npz   masks of the contamination planted in holistic train and gallery images
  <root>/meta.json     generator version, resolved config, type names, per-split counts
  <root>/occluders/    the occluders of the occluded training images, cut out as RGBA PNGs,
                       and index.json with each one's type and box in its source image: the
                       occluder bank that occlusion synthesis (type 'bank') pastes from, as
                       methods on real data crop occluders from the training set by hand

Both npz files hold parallel arrays: `names` (file names), `splits`, `types`, `masks`
([N, H, ceil(W/8)] uint8, bit-packed along the width: np.unpackbits(masks, axis=-1,
count=width)), and `height`, `width`; masks.npz adds `placements`, clutter.npz adds `sources`
(the person id whose clothing the contamination wears, 0 for identity-free kinds).
`load_side_info` unpacks them per file. Version 2 folders (train-only clutter.npz without
`splits` and `sources`) read the same way.

Contamination (`CONTAMINATION_TYPES`, chosen by `synthetic.contamination_types`) is what a
purification module should find: pixels that do not belong to the image's identity but look
like a person. 'pedestrian' is a partially visible non-target pedestrian walking alongside,
cut by the image border and behind the target (as FED models non-target pedestrians), drawn
by the person renderer in another identity's clothing (another train identity in training
images, another test identity in the gallery); 'clothing' is a patch of another identity's
shirt and trousers; 'noise', 'shapes' and 'text' are identity-free digital clutter (version
2's only kinds). It is planted in `clutter_fraction` of the training images and in
`contaminated_gallery_fraction` of the holistic gallery images; the target person is never
hidden by the 'pedestrian' kind, the others may lie over it.

What makes it a re-identification problem rather than a colour lookup:
- identities share a small clothing palette and differ by pattern (stripes, checks, a logo),
  sleeves, shorts, hair, accessories and body shape, with per-identity and per-image colour
  jitter;
- each camera has its own light (gain and colour cast), person scale and foot line, background
  style and sensor noise, and images vary in pose (stride, lean, mirror facing);
- queries are occluded by one of `OCCLUDER_TYPES` covering roughly 20-50% of the image, and of
  each test identity the query camera never holds a gallery image of it;
- `holdout_occluders` lists occluder types seen only by queries: queries are then occluded by
  those types alone, and occluded training and gallery images (hence the occluder bank) by
  the others (the held-out occlusion-type protocol, configs/synthetic_holdout.py).

Everything is a pure function of the config: every image draws from its own random stream keyed
The code is split by what it does: synthetic_config (fields, validation, the dataset key),
synthetic_render (one image), synthetic_plan (which images a dataset holds),
synthetic_cache (the writer and the cache of finished folders) and synthetic_sidefiles (the
side-file readers training imports). This module names all of them for callers.
"""

# pylint: disable=unused-import
from ogfr_jax.data.synthetic_cache import (OCCLUDER_BANK_DIR, check_version,  # noqa: F401
                                           default_cache_dir, ensure, generate)
from ogfr_jax.data.synthetic_config import (BACKGROUND_STYLES, CLOTHING_PATTERNS,  # noqa: F401
                                            CLUTTER_TYPES, CONTAMINATION_TYPES,
                                            GENERATOR_VERSION, IDENTITY_CONTAMINATION,
                                            OCCLUDER_TYPES, OPTIONAL_FIELDS, SPLIT_DIRS,
                                            add_config, config_hash, query_occluder_types,
                                            resolve_config, section, seen_occluder_types)
from ogfr_jax.data.synthetic_plan import Item, iter_images, plan  # noqa: F401
from ogfr_jax.data.synthetic_render import (Camera, Identity, Pose, Rendered,  # noqa: F401
                                            camera_backdrop, draw_camera, draw_identity,
                                            draw_person, draw_pose, render)
from ogfr_jax.data.synthetic_sidefiles import (CONTAMINATION_FILE,  # noqa: F401
                                               clutter_token_mask, contamination_masks,
                                               load_side_info)
