"""Tests for pipelines/make_sample.py: layout, determinism, quirks, class signal."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # Lets plain `pytest` import the package too.
    sys.path.insert(0, str(REPO))

from pipelines import make_sample as ms  # noqa: E402
from pipelines import raw_layout, sample_folder, sample_images  # noqa: E402

TRAIN, VAL = 6, 3
NUM_CLASSES = len(ms.SYNSETS)


def read_train(tar_path) -> dict[str, list[tuple[tarfile.TarInfo, bytes]]]:
    """Class-tar name -> [(member info, bytes)] of the training archive."""
    out = {}
    with tarfile.open(tar_path) as outer:
        for class_info in outer.getmembers():
            with tarfile.open(fileobj=outer.extractfile(class_info)) as inner:
                out[class_info.name] = [
                    (m, inner.extractfile(m).read()) for m in inner.getmembers()
                ]
    return out


def read_flat(tar_path) -> list[tuple[tarfile.TarInfo, bytes]]:
    with tarfile.open(tar_path) as tar:
        return [(m, tar.extractfile(m).read()) for m in tar.getmembers()]


def train_by_path(train) -> dict[str, bytes]:
    """'<synset>/<member name>' -> bytes, the form quirks are recorded in."""
    return {
        f"{cls[:-len('.tar')]}/{m.name}": data
        for cls, members in train.items()
        for m, data in members
    }


def rgb(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float32)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    out = tmp_path_factory.mktemp("small")
    manifest = ms.make_sample(out, seed=0, train_per_class=TRAIN, val_per_class=VAL)
    return out, manifest


@pytest.fixture(scope="module")
def small_train(small):
    return read_train(small[0] / ms.TRAIN_TAR)


@pytest.fixture(scope="module")
def small_val(small):
    return read_flat(small[0] / ms.VAL_TAR)


def test_train_layout(small_train):
    assert list(small_train) == [f"{s}.tar" for s in ms.SYNSETS]
    for cls, members in small_train.items():
        synset = cls[: -len(".tar")]
        names = [m.name for m, _ in members]
        assert len(names) == TRAIN
        assert names == sorted(names)
        for name in names:
            assert re.fullmatch(rf"{synset}_\d+\.JPEG", name), name
        for m, _ in members:  # Deterministic headers.
            assert (m.mode, m.uid, m.gid, m.uname, m.gname) == (0o644, 0, 0, "", "")
            assert m.isfile() and m.mtime == raw_layout.TAR_MTIME


def test_val_layout_and_labels(small, small_val, small_train):
    out, manifest = small
    names = [m.name for m, _ in small_val]
    assert names == [f"ILSVRC2012_val_{i:08d}.JPEG" for i in range(1, len(names) + 1)]
    assert all(re.fullmatch(r"ILSVRC2012_val_\d{8}\.JPEG", n) for n in names)
    assert len(names) == NUM_CLASSES * VAL

    labels = (out / ms.VAL_LABELS).read_text().splitlines()
    assert len(labels) == len(names)
    assert sorted(labels) == sorted(list(ms.SYNSETS) * VAL)
    assert labels != sorted(labels)  # Interleaved, as in real ImageNet.

    # Labels match content: horizontal stripes (class 0) vary along y,
    # vertical stripes (class 1) along x.
    for (_, data), label in zip(small_val, labels):
        if label in ms.SYNSETS[:2]:
            ratio = grad_ratio(rgb(data))
            assert ratio > 2 if label == ms.SYNSETS[0] else ratio < 0.5


def test_manifest(small):
    out, manifest = small
    assert json.loads((out / ms.MANIFEST).read_text()) == manifest
    assert manifest["version"] == ms.FORMAT_VERSION
    assert manifest["seed"] == 0
    assert manifest["synsets"] == list(ms.SYNSETS)
    assert (manifest["train_per_class"], manifest["val_per_class"]) == (TRAIN, VAL)
    assert (manifest["num_train"], manifest["num_val"]) == (60, 30)
    assert Path(manifest["train_tar"]) == out / ms.TRAIN_TAR
    assert Path(manifest["val_tar"]) == out / ms.VAL_TAR
    assert Path(manifest["val_labels"]) == out / ms.VAL_LABELS
    assert set(manifest["quirks"]) == {
        "cmyk", "png", "grayscale", "truncated", "val_grayscale", "val_png"
    }
    marker = json.loads((out / ms.MARKER).read_text())
    assert marker["seed"] == 0 and marker["train_per_class"] == TRAIN
    # No temp files left behind.
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [ms.TRAIN_TAR, ms.VAL_TAR, ms.VAL_LABELS, ms.MANIFEST, ms.MARKER, sample_folder.OWNER]
    )


def test_quirks_are_what_they_claim(small, small_train, small_val, monkeypatch):
    # Other code may let PIL accept truncated files process-wide.
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", False)
    quirks = small[1]["quirks"]
    train = train_by_path(small_train)
    val = {m.name: data for m, data in small_val}

    # One quirk per class, each a real member.
    train_quirks = [quirks[k] for k in ("cmyk", "png", "grayscale", "truncated")]
    assert len({q.split("/")[0] for q in train_quirks}) == 4
    assert quirks["val_grayscale"] != quirks["val_png"]

    def opened(data):
        return Image.open(io.BytesIO(data))

    img = opened(train[quirks["cmyk"]])
    assert (img.format, img.mode) == ("JPEG", "CMYK")
    img = opened(train[quirks["png"]])
    assert img.format == "PNG" and quirks["png"].endswith(".JPEG")
    img = opened(train[quirks["grayscale"]])
    assert (img.format, img.mode) == ("JPEG", "L")
    with pytest.raises(OSError):
        opened(train[quirks["truncated"]]).load()
    img = opened(val[quirks["val_grayscale"]])
    assert (img.format, img.mode) == ("JPEG", "L")
    img = opened(val[quirks["val_png"]])
    assert img.format == "PNG"

    # Every other file is an ordinary, complete RGB JPEG.
    ordinary = [d for p, d in train.items() if p not in train_quirks] + [
        d for n, d in val.items() if n not in (quirks["val_grayscale"], quirks["val_png"])
    ]
    assert len(ordinary) == 60 - 4 + 30 - 2
    for data in ordinary:
        img = opened(data)
        assert (img.format, img.mode) == ("JPEG", "RGB")
        img.load()


def test_image_sizes(small_train, small_val):
    datas = [d for ms_ in small_train.values() for _, d in ms_] + [d for _, d in small_val]
    sizes = [Image.open(io.BytesIO(d)).size for d in datas]
    assert all(150 <= s <= 500 for size in sizes for s in size)
    assert len(set(sizes)) > len(sizes) // 2  # Sizes and aspect ratios vary.
    assert any(w > h for w, h in sizes) and any(h > w for w, h in sizes)


def test_deterministic(small, tmp_path):
    out, _ = small
    files = (ms.TRAIN_TAR, ms.VAL_TAR, ms.VAL_LABELS)
    ms.make_sample(tmp_path / "again", seed=0, train_per_class=TRAIN, val_per_class=VAL)
    for name in files:
        assert (tmp_path / "again" / name).read_bytes() == (out / name).read_bytes()
    ms.make_sample(tmp_path / "other", seed=1, train_per_class=TRAIN, val_per_class=VAL)
    for name in files:
        assert (tmp_path / "other" / name).read_bytes() != (out / name).read_bytes()


def resized(img: np.ndarray, short_side: int) -> np.ndarray:
    """RGB image resized so its shorter side is ``short_side``."""
    pil = Image.fromarray(img.astype(np.uint8))
    w, h = pil.size
    s = short_side / min(w, h)
    return np.asarray(pil.resize((round(w * s), round(h * s)), Image.BOX), np.float32)


def grad_ratio(img: np.ndarray) -> float:
    """Mean |vertical gradient| / mean |horizontal gradient| over RGB (the two
    colours may differ in hue only), at a scale (shorter side 64) where the
    pixel noise has averaged out."""
    g = resized(img, 64)
    return float(np.abs(np.diff(g, axis=0)).mean() / np.abs(np.diff(g, axis=1)).mean())


def high_freq_fraction(img: np.ndarray) -> float:
    """Share of (non-DC) spectral energy above a quarter of Nyquist, after the
    pipeline's shorter-side-to-256 resize."""
    g = resized(img, 256)
    g = g - g.mean(axis=(0, 1))
    power = (np.abs(np.fft.fftshift(np.fft.fft2(g, axes=(0, 1)), axes=(0, 1))) ** 2).sum(2)
    fy = np.abs(np.fft.fftshift(np.fft.fftfreq(g.shape[0])))[:, None]
    fx = np.abs(np.fft.fftshift(np.fft.fftfreq(g.shape[1])))[None, :]
    return float(power[np.maximum(fy, fx) > 0.125].sum() / power.sum())


@pytest.fixture(scope="module")
def larger(tmp_path_factory):
    """30 decodable images per class: (class index, RGB array) pairs."""
    out = tmp_path_factory.mktemp("larger")
    manifest = ms.make_sample(out, seed=3, train_per_class=30, val_per_class=1)
    train = train_by_path(read_train(out / ms.TRAIN_TAR))
    return [
        (ms.SYNSETS.index(path.split("/")[0]), rgb(data))
        for path, data in train.items()
        if path != manifest["quirks"]["truncated"]
    ]


def test_mean_colour_does_not_give_class_away(larger):
    labels = np.array([c for c, _ in larger])
    means = np.stack([img.reshape(-1, 3).mean(axis=0) for _, img in larger])
    centroids = np.stack([means[labels == c].mean(axis=0) for c in range(NUM_CLASSES)])
    dist = np.linalg.norm(means[:, None, :] - centroids[None], axis=2)
    # In-sample accuracy, so already optimistic; chance is 10%.
    accuracy = float((dist.argmin(axis=1) == labels).mean())
    assert accuracy < 0.4, accuracy


def test_texture_differs_between_classes(larger):
    ratios = {c: [] for c in range(NUM_CLASSES)}
    high = {c: [] for c in range(NUM_CLASSES)}
    for c, img in larger:
        if c in (0, 1):
            ratios[c].append(grad_ratio(img))
        if c in (6, 9):
            high[c].append(high_freq_fraction(img))
    # Horizontal vs vertical stripes: separable by gradient direction alone.
    assert min(ratios[0]) > 2 > 0.5 > max(ratios[1])
    # Fine speckle vs smooth blobs: separable by high-frequency energy.
    assert min(high[9]) > max(high[6])


def test_ensure_sample_reuses_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ALEXNET_TF_CACHE", str(tmp_path / "cache"))
    assert ms.default_cache_dir() == tmp_path / "cache" / "sample"
    kwargs = dict(train_per_class=4, val_per_class=1)

    first = ms.ensure_sample(seed=0, **kwargs)
    out = tmp_path / "cache" / "sample"
    assert Path(first["train_tar"]) == out / ms.TRAIN_TAR
    files = [out / n for n in (ms.TRAIN_TAR, ms.VAL_TAR, ms.MANIFEST, ms.MARKER)]
    mtimes = [p.stat().st_mtime_ns for p in files]

    assert ms.ensure_sample(seed=0, **kwargs) == first
    assert [p.stat().st_mtime_ns for p in files] == mtimes  # Not rewritten.

    # Other parameters, or an incomplete sample, trigger a rebuild.
    assert ms.ensure_sample(seed=1, **kwargs)["seed"] == 1
    assert json.loads((out / ms.MARKER).read_text())["seed"] == 1
    (out / ms.MARKER).unlink()
    assert ms.ensure_sample(out, seed=1, **kwargs)["seed"] == 1
    assert (out / ms.MARKER).exists()


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("ALEXNET_TF_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert ms.default_cache_dir() == tmp_path / "alexnet_tf" / "sample"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert ms.default_cache_dir() == Path.home() / ".cache" / "alexnet_tf" / "sample"


def test_bad_counts_raise(tmp_path):
    with pytest.raises(ValueError, match="train_per_class"):
        ms.make_sample(tmp_path, train_per_class=3)
    with pytest.raises(ValueError, match="val_per_class"):
        ms.make_sample(tmp_path, val_per_class=0)
    assert not any(tmp_path.iterdir())  # Nothing written.


def run_cli(*args):
    return subprocess.run(
        [str(REPO / ".venv" / "bin" / "python"), "-m", "pipelines.make_sample", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    "flag, value", [("--train_per_class", "3"), ("--val_per_class", "0")]
)
def test_cli_bad_input(tmp_path, flag, value):
    result = run_cli("--output_dir", str(tmp_path / "out"), flag, value)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and flag in lines[0], result.stderr
    assert not (tmp_path / "out").exists()


def test_cli_writes_sample(tmp_path):
    out = tmp_path / "out"
    result = run_cli("--output_dir", str(out), "--train_per_class", "4", "--val_per_class", "1")
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / ms.MANIFEST).read_text())
    assert (manifest["num_train"], manifest["num_val"]) == (40, 10)
    assert (out / ms.MARKER).exists()
    assert str(out) in result.stderr  # Logged where it wrote.


@pytest.mark.parametrize("shape", ["small", "imagenet"])
@pytest.mark.parametrize("theirs", [ms.TRAIN_TAR, ms.VAL_TAR, ms.VAL_LABELS])
def test_cli_never_replaces_imagenet_files_it_did_not_write(tmp_path, shape, theirs):
    real = tmp_path / "imagenet"
    real.mkdir()
    (real / theirs).write_bytes(b"the real thing")
    result = run_cli("--output_dir", str(real), "--shape", shape, "--train_per_class", "4", "--val_per_class", "1")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"make_sample: error: {real} holds {theirs}, not written by make_sample: a sample would replace them; "
        "give an empty or new --output_dir")
    assert sorted(p.name for p in real.iterdir()) == [theirs]  # Nothing written,
    assert (real / theirs).read_bytes() == b"the real thing"  # nothing replaced.


def test_a_sample_folder_can_be_written_again(tmp_path):
    out = tmp_path / "out"
    for _ in range(2):  # Its own files: replaced without a word.
        assert run_cli("--output_dir", str(out), "--train_per_class", "4", "--val_per_class", "1").returncode == 0
    assert (out / ms.MARKER).exists()


# -- the ImageNet-shaped sample ------------------------------------------------


@pytest.fixture(scope="module")
def imagenet_shaped(tmp_path_factory):
    """1000 classes of 2 images, 30 validation images; small pictures, to be quick."""
    out = tmp_path_factory.mktemp("imagenet")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sample_images, "imagenet_size", lambda rng: (int(rng.integers(40, 60)), int(rng.integers(40, 80))))
        manifest = ms.make_imagenet_sample(out, seed=1, train_per_class=2, val_images=30)
    return out, manifest


def test_imagenet_shape_has_every_synset_in_order_nested(imagenet_shaped):
    from pipelines import class_labels

    out, manifest = imagenet_shaped
    train = read_train(out / ms.TRAIN_TAR)
    synsets = class_labels.ilsvrc_synsets()
    assert len(synsets) == 1000 and list(train) == [f"{s}.tar" for s in synsets]
    assert all(len(members) == 2 for members in train.values()) and manifest["num_train"] == 2000
    for cls, members in list(train.items())[:5]:
        assert all(re.fullmatch(cls[:-4] + r"_\d+\.JPEG", m.name) for m, _ in members)
    # CMYK and PNG at ImageNet's rate: at least one of each, and what they claim.
    by_path = train_by_path(train)
    (cmyk,), (png,) = manifest["quirks"]["cmyk"], manifest["quirks"]["png"]
    assert Image.open(io.BytesIO(by_path[cmyk])).mode == "CMYK"
    assert by_path[png].startswith(b"\x89PNG")


def test_imagenet_shape_validation_numbers_are_real_and_labels_need_no_file(imagenet_shaped):
    out, manifest = imagenet_shaped
    assert not (out / ms.VAL_LABELS).exists()
    val = read_flat(out / ms.VAL_TAR)
    numbers = [int(re.fullmatch(r"ILSVRC2012_val_(\d{8})\.JPEG", m.name).group(1)) for m, _ in val]
    assert numbers == manifest["val_numbers"] and len(set(numbers)) == 30
    assert numbers != sorted(numbers) and max(numbers) > 30  # Unsorted, sparse.
    assert all(1 <= n <= 50_000 for n in numbers)
    # Each image is drawn from the class the shipped list gives its number.
    labels = ms.ilsvrc_val_labels()
    index = {s: i for i, s in enumerate(manifest["synsets"])}
    n = numbers[0]
    rng = np.random.default_rng([1, ms._STREAM_VAL, 1000, n])
    size = (int(rng.integers(40, 60)), int(rng.integers(40, 80)))
    expected = sample_images.encode(sample_images.render_sized(index[labels[n - 1]], rng, size), None)
    assert val[0][1] == expected


def test_imagenet_shape_cli_bad_input(tmp_path):
    result = run_cli("--shape=imagenet", "--output_dir", str(tmp_path / "out"), "--val_images", "50001")
    assert result.returncode == 2 and "val_images must be between 1 and 50000" in result.stderr
    assert not (tmp_path / "out").exists()
