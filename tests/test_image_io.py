"""Image decoding: modes to RGB uint8, resizing, and errors that name the bad file."""

import io

import numpy as np
from PIL import Image
import pytest

from ogfr_jax.data.image_io import CorruptImageError, load_image, load_image_bytes


def _save(img: Image.Image, path, **kwargs):
  img.save(path, **kwargs)
  return path


def _rgb(h=12, w=6, seed=0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize('name', ['a.png', 'a.tif', 'a.TIF', 'a.bmp'])
def test_lossless_rgb_roundtrip(tmp_path, name):
  arr = _rgb()
  out = load_image(_save(Image.fromarray(arr), tmp_path / name,
                         format='TIFF' if name.lower().endswith('tif') else None))
  assert out.dtype == np.uint8 and out.shape == (12, 6, 3)
  np.testing.assert_array_equal(out, arr)


def test_jpeg_decodes_close_to_source(tmp_path):
  arr = np.tile(np.linspace(0, 255, 32, dtype=np.uint8)[None, :, None], (64, 1, 3))
  out = load_image(_save(Image.fromarray(arr), tmp_path / 'a.jpg', quality=95))
  assert out.shape == (64, 32, 3) and out.dtype == np.uint8
  assert np.abs(out.astype(int) - arr).mean() < 3


def test_grayscale_becomes_three_equal_channels(tmp_path):
  gray = np.arange(72, dtype=np.uint8).reshape(12, 6) * 3
  out = load_image(_save(Image.fromarray(gray, 'L'), tmp_path / 'g.png'))
  assert out.shape == (12, 6, 3)
  for c in range(3):
    np.testing.assert_array_equal(out[..., c], gray)


def test_palette_is_expanded(tmp_path):
  img = Image.new('P', (3, 2))
  img.putpalette([10, 20, 30, 200, 100, 0, 0, 0, 255] + [0] * (256 * 3 - 9))
  img.putdata([0, 1, 2, 2, 1, 0])
  out = load_image(_save(img, tmp_path / 'p.png'))
  want = np.array([[[10, 20, 30], [200, 100, 0], [0, 0, 255]],
                   [[0, 0, 255], [200, 100, 0], [10, 20, 30]]], np.uint8)
  np.testing.assert_array_equal(out, want)


def test_palette_transparency_is_black(tmp_path):
  img = Image.new('P', (2, 1))
  img.putpalette([10, 20, 30, 200, 100, 0] + [0] * (256 * 3 - 6))
  img.putdata([0, 1])
  out = load_image(_save(img, tmp_path / 'p.png', transparency=1))
  np.testing.assert_array_equal(out[0], [[10, 20, 30], [0, 0, 0]])


def test_rgba_is_composited_on_black(tmp_path):
  rgba = np.array([[[200, 100, 50, 255], [200, 100, 50, 0], [200, 100, 50, 128]]], np.uint8)
  out = load_image(_save(Image.fromarray(rgba, 'RGBA'), tmp_path / 'a.png'))
  np.testing.assert_array_equal(out[0], [[200, 100, 50], [0, 0, 0], [100, 50, 25]])


def test_gray_alpha_is_composited_on_black(tmp_path):
  la = Image.fromarray(np.array([[[90, 255], [90, 0]]], np.uint8), 'LA')
  out = load_image(_save(la, tmp_path / 'la.png'))
  np.testing.assert_array_equal(out[0], [[90, 90, 90], [0, 0, 0]])


@pytest.mark.parametrize('name', ['d.png', 'd.tif'])
def test_16_bit_maps_full_range_to_8_bit(tmp_path, name):
  values = np.array([[0, 257, 257 * 128, 65535]], np.uint16)
  img = Image.fromarray(values)
  assert img.mode.startswith('I;16')
  out = load_image(_save(img, tmp_path / name))
  assert out.dtype == np.uint8
  np.testing.assert_array_equal(out[0, :, 0], [0, 1, 128, 255])
  np.testing.assert_array_equal(out[..., 0], out[..., 2])


def test_32_bit_int_and_float_tiffs(tmp_path):
  ints = Image.fromarray(np.array([[0, 257 * 10, 70000, -5]], np.int32), 'I')
  out = load_image(_save(ints, tmp_path / 'i.tif'))
  np.testing.assert_array_equal(out[0, :, 0], [0, 10, 255, 0])
  floats = Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32), 'F')
  out = load_image(_save(floats, tmp_path / 'f.tif'))
  np.testing.assert_array_equal(out[0, :, 1], [0, 128, 255])


def test_cmyk_jpeg(tmp_path):
  out = load_image(_save(Image.fromarray(_rgb()).convert('CMYK'), tmp_path / 'c.jpg'))
  assert out.shape == (12, 6, 3) and out.dtype == np.uint8


def test_resize_to_requested_height_width(tmp_path):
  arr = _rgb(40, 20)
  out = load_image(_save(Image.fromarray(arr), tmp_path / 'a.png'), size=(8, 4))
  assert out.shape == (8, 4, 3)
  want = np.asarray(Image.fromarray(arr).resize((4, 8), Image.Resampling.BILINEAR))
  np.testing.assert_array_equal(out, want)


def test_jpeg_draft_downscale_matches_full_decode(tmp_path):
  # A smooth image: decoding at 1/4 scale and resizing must agree with a full decode closely.
  y, x = np.mgrid[0:512, 0:256]
  arr = np.stack([y / 2, x, (x + y) / 3], -1).astype(np.uint8)
  path = _save(Image.fromarray(arr), tmp_path / 'big.jpg', quality=95)
  out = load_image(path, size=(128, 64))
  assert out.shape == (128, 64, 3)
  full = np.asarray(Image.open(path).convert('RGB').resize((64, 128), Image.Resampling.BILINEAR))
  assert np.abs(out.astype(int) - full).mean() < 3


def test_bytes_variant_matches_file(tmp_path):
  path = _save(Image.fromarray(_rgb()), tmp_path / 'a.png')
  np.testing.assert_array_equal(load_image_bytes(path.read_bytes()), load_image(path))
  np.testing.assert_array_equal(load_image_bytes(path.read_bytes(), size=(6, 3)),
                                load_image(path, size=(6, 3)))


def test_zero_byte_file_names_the_file(tmp_path):
  path = tmp_path / '0001_c1s1_000001_01.jpg'
  path.write_bytes(b'')
  with pytest.raises(CorruptImageError, match='0001_c1s1_000001_01.jpg'):
    load_image(path)


@pytest.mark.parametrize('fmt,name', [('JPEG', 't.jpg'), ('PNG', 't.png'), ('TIFF', 't.tif')])
def test_truncated_file_names_the_file(tmp_path, fmt, name):
  buf = io.BytesIO()
  Image.fromarray(_rgb(64, 32)).save(buf, format=fmt)
  data = buf.getvalue()
  path = tmp_path / name
  path.write_bytes(data[:len(data) // 2])
  with pytest.raises(CorruptImageError, match=name):
    load_image(path)


def test_not_an_image_names_the_file(tmp_path):
  path = tmp_path / 'Thumbs.jpg'
  path.write_bytes(b'\xd0\xcf\x11\xe0 this is an OLE file, not a JPEG')
  with pytest.raises(CorruptImageError, match='Thumbs.jpg') as e:
    load_image(path)
  assert isinstance(e.value, ValueError)
  with pytest.raises(CorruptImageError, match='frame 7'):
    load_image_bytes(b'garbage', name='frame 7')
  with pytest.raises(CorruptImageError, match='empty'):
    load_image_bytes(b'', name='frame 8')


def test_missing_file_is_not_reported_as_corrupt(tmp_path):
  with pytest.raises(FileNotFoundError):
    load_image(tmp_path / 'missing.jpg')


def test_bad_size_is_rejected(tmp_path):
  path = _save(Image.fromarray(_rgb()), tmp_path / 'a.png')
  with pytest.raises(ValueError, match='height, width'):
    load_image(path, size=(0, 4))
