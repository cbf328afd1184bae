"""cct.decode: the one image decoder — modes, sizes, EXIF orientation, resize modes, errors, refused bombs —
shared by datasets, streaming and predict."""
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import cct
from cct import data, decode, predict
from cct.decode import UnreadableImageError, decode_image, decode_images, image_header, resize_image
from cct.preprocess import Preprocessing
from cct.sources import DataError

MODES = (("rgb.jpg", (45, 61), "RGB"), ("rgba.png", (32, 32), "RGBA"), ("gray.png", (10, 90), "L"),
         ("palette.gif", (40, 20), "P"), ("cmyk.jpg", (33, 33), "CMYK"), ("bits.bmp", (64, 64), "1"),
         ("deep.png", (16, 24), "I;16"), ("big.jpg", (120, 100), "RGB"))


def _files(folder) -> list:
    """Files of several sizes and Pillow modes, as users have them."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for name, (h, w), mode in MODES:
        Image.fromarray(rng.integers(0, 255, size=(h, w, 3), dtype=np.uint8)).convert(mode).save(folder / name)
        files.append(folder / name)
    return files


def test_modes_sizes_and_channels(tmp_path):
    for path in _files(tmp_path):
        with Image.open(path) as im:
            native = im.size[::-1]
            gray = im.mode in decode.GRAY_MODES
        a = decode_image(path, size=None, channels=None)
        assert a.dtype == np.uint8 and a.shape == (1 if gray else 3, *native) and a.flags.c_contiguous
        assert decode_image(str(path), size=(12, 20), channels=1).shape == (1, 12, 20)
        assert decode_image(path.read_bytes(), size=(12, 20), channels=3).shape == (3, 12, 20)
        assert image_header(path) == (native, Image.open(path).mode)
    rgba = decode_image(tmp_path / "rgba.png", size=None, channels=3)  # alpha dropped, as Pillow's convert
    assert np.array_equal(rgba, np.asarray(Image.open(tmp_path / "rgba.png").convert("RGB")).transpose(2, 0, 1))
    luma = decode_image(tmp_path / "rgba.png", size=None, channels=1)
    assert np.array_equal(luma[0], np.asarray(Image.open(tmp_path / "rgba.png").convert("RGB").convert("L")))


def test_wide_grayscale_is_scaled_not_clamped(tmp_path):
    """16-bit, 32-bit and float grayscale: Pillow's convert clamps at 255, which turned two 16-bit classes into the
    same white image."""
    ramp = np.linspace(0, 65535, 16).reshape(4, 4).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "ramp.png")  # mode I;16
    Image.fromarray(np.full((4, 4), 8000, np.uint16)).save(tmp_path / "dark.png")
    Image.fromarray(np.full((4, 4), 0.5, np.float32)).save(tmp_path / "half.tif")  # mode F, in [0, 1]
    Image.fromarray(np.full((4, 4), 100, np.int32)).save(tmp_path / "small.tif")  # mode I, already 8-bit values
    got = {f: decode_image(tmp_path / f, size=None, channels=None) for f in ("ramp.png", "dark.png", "half.tif",
                                                                              "small.tif")}
    np.testing.assert_array_equal(got["ramp.png"][0], np.rint(ramp / 257).astype(np.uint8))
    assert got["dark.png"].max() == 31 and got["half.tif"].max() == 128 and got["small.tif"].max() == 100
    rgb = decode_image(tmp_path / "ramp.png", size=None, channels=3)
    assert rgb.shape == (3, 4, 4) and (rgb[0] == got["ramp.png"][0]).all()


def test_resize_is_pillow_bicubic(tmp_path):
    (path,) = [p for p in _files(tmp_path) if p.name == "rgba.png"]
    a = decode_image(path, size=None, channels=3)
    want = np.asarray(Image.open(path).convert("RGB").resize((7, 9), Image.BICUBIC)).transpose(2, 0, 1)
    assert np.array_equal(resize_image(a, (9, 7)), want)
    assert np.array_equal(decode_image(path, size=(9, 7), channels=3), want)  # PNG: no draft, the same resize
    assert resize_image(a[:1], (9, 7)).shape == (1, 9, 7)


def test_unreadable_images_name_the_file(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(UnreadableImageError, match=f"cannot read image {bad}: cannot identify image file") as e:
        decode_image(bad, size=(8, 8), channels=3)
    assert isinstance(e.value, DataError) and type(e.value.cause).__name__ == "UnidentifiedImageError"
    with pytest.raises(DataError, match="No such file"):
        decode_image(tmp_path / "missing.png", size=None, channels=None)
    with pytest.raises(DataError, match=r"cannot read image \(12 bytes\)"):
        decode_image(b"not an image", size=None, channels=None)
    out = decode_images([b"not an image", (tmp_path / "x.png").as_posix()], size=None, channels=None, progress=False)
    assert out[0].startswith("UnidentifiedImageError: ") and out[1].startswith("FileNotFoundError: ")


def test_images_past_the_pixel_limit_are_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 64)
    Image.new("RGB", (80, 80)).save(tmp_path / "big.png")  # above the limit, below twice it: Pillow only warns
    with pytest.raises(DataError, match="exceeds limit"):
        decode_image(tmp_path / "big.png", size=(8, 8), channels=3)
    with pytest.raises(DataError, match="exceeds limit"):
        image_header(tmp_path / "big.png")


@pytest.mark.parametrize("channels", [1, 3])
def test_predict_data_and_stream_decode_identically(tmp_path, channels):
    """One decoder: `cct predict`, the in-memory dataset and the streamed one see the same pixels, JPEG
    draft-mode shrinking, palettes, CMYK and 16-bit images included."""
    assert predict.decode_image is decode.decode_image
    files = _files(tmp_path / "tree" / "train" / "a")
    _files(tmp_path / "tree" / "test" / "a")
    size = (24, 16)
    memory = data.load(tmp_path / "tree", img_size=size, in_chans=channels, cache_dir=tmp_path / "cache",
                       stream=False, progress=False)
    streamed = data.load(tmp_path / "tree", img_size=size, in_chans=channels, stream=True, workers=0,
                         progress=False)
    order = sorted(files, key=lambda p: p.name)  # the dataset's file order within a class
    from_predict = torch.stack([predict.load_image(p, size, channels) for p in order])
    assert from_predict.shape == (len(files), channels, *size)
    assert torch.equal(memory.train.images, from_predict)
    assert torch.equal(streamed.train.images[torch.arange(len(files))], from_predict)
    assert torch.equal(from_predict[0], torch.from_numpy(decode_image(order[0].read_bytes(), size=size,
                                                                      channels=channels)))  # bytes as a path


def _sideways_photo(path, orientation=6):
    """A JPEG stored as a phone stores it: pixels sideways (left half red, right half blue, 40x20) and an
    EXIF orientation tag saying how to turn them upright (6: 90 degrees clockwise)."""
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)
    pixels[:, :20, 0] = 255
    pixels[:, 20:, 2] = 255
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(pixels).save(path, exif=exif, quality=95)
    return path


def test_exif_orientation_is_applied_everywhere(tmp_path):
    (tmp_path / "tree" / "train" / "a").mkdir(parents=True)
    photo = _sideways_photo(tmp_path / "tree" / "train" / "a" / "phone.jpg")
    upright = decode_image(photo, size=None, channels=3)
    assert upright.shape == (3, 40, 20) and image_header(photo) == ((40, 20), "RGB")  # turned: taller than wide
    top, bottom = upright[:, :15].mean(axis=(1, 2)), upright[:, 25:].mean(axis=(1, 2))
    assert top[0] > 200 > top[2] and bottom[2] > 200 > bottom[0]  # red was on the left: now on top
    small = decode_image(photo, size=(8, 4), channels=3)  # the JPEG draft path, sized after turning
    assert small.shape == (3, 8, 4) and small[0, :3].mean() > 200 and small[2, -3:].mean() > 200
    assert torch.equal(predict.load_image(photo, (8, 4), 3), torch.from_numpy(small))
    shutil.copy(photo, tmp_path / "tree" / "train" / "a" / "again.jpg")
    (tmp_path / "tree" / "test" / "a").mkdir(parents=True)
    shutil.copy(photo, tmp_path / "tree" / "test" / "a" / "phone.jpg")
    for streamed in (False, True):
        ds = data.load(tmp_path / "tree", img_size=(8, 4), stream=streamed, workers=0, cache_dir=tmp_path / "c",
                       progress=False)
        assert torch.equal(ds.test.images[torch.arange(1)][0], torch.from_numpy(small))
    native = data.load(tmp_path / "tree", stream=True, workers=0, progress=False)
    assert native.img_size == (40, 20)  # the probed size is the upright one


def test_crop_mode_keeps_the_aspect_ratio(tmp_path):
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)  # red sides, a green square in the centre
    pixels[:, :, 0] = 255
    pixels[:, 10:30] = (0, 255, 0)
    Image.fromarray(pixels).save(tmp_path / "wide.png")
    cropped = decode_image(tmp_path / "wide.png", size=(10, 10), channels=3, resize_mode="crop")
    squashed = decode_image(tmp_path / "wide.png", size=(10, 10), channels=3)
    assert cropped.shape == squashed.shape == (3, 10, 10)
    assert cropped[1].min() > 220 and cropped[0].max() < 40  # only the centre square (bicubic blurs its edge)
    assert squashed[0, :, 0].mean() > 200  # a plain resize keeps the red sides
    assert np.array_equal(resize_image(decode_image(tmp_path / "wide.png", size=None, channels=3), (10, 10),
                                       resize_mode="crop"), cropped)
    with pytest.raises(AssertionError, match="resize_mode"):
        decode_image(tmp_path / "wide.png", size=(10, 10), channels=3, resize_mode="fit")


def test_crop_mode_through_load_the_cache_and_predict(tmp_path, monkeypatch):
    for split in ("train", "test"):
        for i in range(2):
            (tmp_path / "t" / split / "a").mkdir(parents=True, exist_ok=True)
            shutil.copy(_sideways_photo(tmp_path / "p.jpg", orientation=1), tmp_path / "t" / split / "a" / f"{i}.jpg")
    cache = tmp_path / "cache"
    plain = data.load(tmp_path / "t", img_size=10, cache_dir=cache, progress=False)
    cropped = data.load(tmp_path / "t", img_size=10, cache_dir=cache, progress=False, resize_mode="crop")
    assert len(list((cache / "decoded").glob("*.npz"))) == 2  # the mode is part of the cache key
    assert not torch.equal(plain.train.images, cropped.train.images)
    want = decode_image(tmp_path / "t" / "train" / "a" / "0.jpg", size=(10, 10), channels=3, resize_mode="crop")
    assert torch.equal(cropped.train.images[0], torch.from_numpy(want))
    with pytest.raises(DataError, match="--resize-mode"):
        data.load(tmp_path / "t", cache_dir=cache, progress=False, resize_mode="fit")
    model = cct.create_model("cct_2_3x2_32", num_classes=2, img_size=10)
    prep = Preprocessing((10, 10), 3, resize_mode="crop")
    ckpt = cct.save_checkpoint(model, tmp_path / "m.pt", eval=prep.to_dict())
    clf = predict.open_classifier(ckpt)
    assert clf.preprocessing.resize_mode == "crop"
    calls = []
    monkeypatch.setattr(predict, "decode_image", lambda *a, **k: calls.append(k["resize_mode"]) or want)
    predict.predict(clf, [tmp_path / "t" / "train" / "a" / "0.jpg"])
    assert calls == ["crop"]
    old = {k: v for k, v in prep.to_dict().items() if k != "resize_mode"}  # a record from before the field
    assert Preprocessing.from_dict(old).resize_mode == "resize"
