"""Datasets for domain-generalised semantic segmentation, read in their distributed layouts.

Every dataset yields an RGB image and a map of Cityscapes train ids (0..18, 255 = ignore),
or 0..K-1 for a user's own `folder` of images. Raw label files go through a 256-entry
look-up table while loading, so no conversion scripts are needed. The module also holds
the paper's training augmentation and a procedural street-scene dataset in five visual
domains that needs no download.

    train = build_dataset("gta", "data/gta", "train", train=True)   # random 512 crops
    val = build_dataset("cityscapes", None, "val", train=False)     # default root data/cityscapes
    image, label = train[0]     # float32 (3, 512, 512) normalised, int64 (512, 512)
    sample = val[0]             # dict(image=(3, h, w) at test scale, label=(H, W) full size, name, index)
    rgb, ids = val.read(0)      # raw uint8 (H, W, 3) and uint8 (H, W)
    image = to_test_tensor(my_rgb, TEST_SIZES["cityscapes"])  # any uint8 (H, W, 3) picture

Names: gta, synthia, cityscapes, bdd, mapillary, acdc[:fog|night|rain|snow],
synthetic[:game|photo|fog|night|rain] and folder (root required); `gta+synthia` joins
sources. `parse_data("gta,cityscapes=/d/cs")` reads the command-line form.

Reading order: the classes and label tables, the paper's augmentation, the dataset classes
and `build_dataset`; then where each dataset keeps its files and how they are read; last,
the synthetic street scenes, a section of their own that a reader of the method can skip.
"""

import bisect
import json
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import ConcatDataset, Dataset

# ------------------------------------------------------------------ Classes, colours and label ids


CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light",
    "traffic sign", "vegetation", "terrain", "sky", "person", "rider", "car", "truck",
    "bus", "train", "motorcycle", "bicycle",
)
CITYSCAPES_PALETTE = np.array([
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
    (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
    (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100),
    (0, 80, 100), (0, 0, 230), (119, 11, 32),
], dtype=np.uint8)
IGNORE = 255
# ImageNet statistics on 0-255 RGB pixels, as DINOv2 was trained with.
MEAN = (123.675, 116.28, 103.53)
STD = (58.395, 57.12, 57.375)


def palette_for(num_classes: int) -> np.ndarray:
    """(K, 3) uint8 colours: Cityscapes' for 19 classes, else K distinct colours around the hue circle."""
    if num_classes == len(CITYSCAPES_CLASSES):
        return CITYSCAPES_PALETTE.copy()
    i = np.arange(num_classes)
    # Golden-ratio steps keep any prefix of hues well spread; alternating saturation and
    # brightness separate neighbours further.
    hsv = np.stack([_fraction(i * 0.6180339887), 0.55 + 0.45 * (i % 2), 255 * (1 - 0.35 * (i // 2 % 2))])
    return hsv_to_rgb(hsv).T.round().astype(np.uint8)  # (3, K) -> (K, 3)


def colorize(label: np.ndarray | torch.Tensor, palette: np.ndarray = CITYSCAPES_PALETTE) -> np.ndarray:
    """(H, W) class ids -> (H, W, 3) uint8 colours; ignore (255) and unknown ids are black."""
    label = np.asarray(label)
    if label.dtype != np.uint8 and label.size and (label.min() < 0 or label.max() > 255):
        raise ValueError(f"colorize expects class ids in 0..255, got values {label.min()}..{label.max()}")
    table = np.zeros((256, 3), dtype=np.uint8)
    table[: len(palette)] = palette
    return table[label.astype(np.uint8)]


# Cityscapes label id -> train id (cityscapesScripts' helpers/labels.py); GTAV and ACDC label files use
# the same ids (0..33), as the official Rein tools/convert_datasets/gta.py assumes.
CITYSCAPES_ID_TO_TRAIN = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9,
                          23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
# Synthia RAND-CITYSCAPES class id (0..22) -> train id, from its README.txt as DAFormer's
# tools/convert_datasets/synthia.py applies it; terrain, truck and train never occur in its images.
SYNTHIA_ID_TO_TRAIN = {3: 0, 4: 1, 2: 2, 21: 3, 5: 4, 7: 5, 15: 6, 9: 7, 6: 8, 16: 9,
                       1: 10, 10: 11, 17: 12, 8: 13, 18: 14, 19: 15, 20: 16, 12: 17, 11: 18}
# Mapillary names that are not one of the 19 map by the words they contain, in this order: the
# rules of the official Rein tools/convert_datasets/mapillary2cityscape.py (from openseg.pytorch).
MAPILLARY_RULES = (
    (("trafficsign", "front", "back"), 7),
    (("onrail",), 16),
    (("cyclist", "rider"), 12),
    (("pole", "streetlight"), 5),
    (("curb", "pedestrianarea"), 1),
    (("crosswalkplain", "parking", "bikelane", "servicelane", "lanemarking"), 0),
)


def mapillary_train_id(readable: str) -> int:
    """Train id of a Mapillary class from its readable name (e.g. "Curb Cut" -> 1), 255 if none."""
    key = readable.lower().replace(" ", "").replace("-", "")
    exact = {name.replace(" ", ""): i for i, name in enumerate(CITYSCAPES_CLASSES)}
    if key in exact:
        return exact[key]
    return next((train_id for words, train_id in MAPILLARY_RULES if any(w in key for w in words)), IGNORE)


def _mapillary_names(root: Path) -> list[str]:
    """Readable class names, in label-value order, from the dataset's own config file."""
    candidates = (root / "config_v1.2.json", root / "config.json")
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise FileNotFoundError(f"Mapillary's class list {candidates[0]} not found; it ships with "
                                "the dataset and defines what each label value means")
    try:
        names = [entry["readable"] for entry in json.loads(path.read_text())["labels"]]
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{path} is not a Mapillary config: expected a 'labels' list of entries "
                         f"with a 'readable' name ({error!r})") from error
    if not 0 < len(names) <= 255:
        raise ValueError(f"{path} lists {len(names)} classes; expected 1..255")
    return names


def label_table(name: str, root: Path | None = None, num_classes: int = 19) -> tuple[np.ndarray, np.ndarray]:
    """(256,) uint8 raw label value -> train id (255 unless mapped), and (256,) bool: the values
    that dataset `name` defines. Names other than gta, synthia, cityscapes, acdc and mapillary
    stand for files that already hold the ids 0..num_classes-1 and 255 (the official tools'
    `_labelTrainIds.png`, BDD100K, a folder's labels). Mapillary's config under `root` says
    what its values mean."""
    if name in ("cityscapes", "gta", "acdc"):
        mapping, known = CITYSCAPES_ID_TO_TRAIN, range(34)
    elif name == "synthia":
        mapping, known = SYNTHIA_ID_TO_TRAIN, range(23)
    elif name == "mapillary":
        names = _mapillary_names(Path(root or DATA_ROOTS["mapillary"]))
        mapping = {i: t for i, n in enumerate(names) if (t := mapillary_train_id(n)) != IGNORE}
        known = range(len(names))
    else:
        mapping, known = {i: i for i in range(num_classes)}, [*range(num_classes), IGNORE]
    lut, is_known = np.full(256, IGNORE, dtype=np.uint8), np.zeros(256, dtype=bool)
    lut[list(mapping)] = list(mapping.values())
    is_known[list(known)] = True
    return lut, is_known


# ------------------------- Augmentation (the official configs' mmseg pipeline), test-time resizing


def _fraction(x: np.ndarray) -> np.ndarray:
    """x modulo 1, elementwise; numpy's float % is several times slower."""
    return x - np.floor(x)


# Colour conversions work channel-first, (3, ...): each channel is then one contiguous
# plane, several times faster in numpy than strided (..., 3) pixels.

def rgb_to_hsv(rgb: np.ndarray) -> np.ndarray:
    """(3, ...) RGB in [0, 255] -> (3, ...) hue in [0, 1), saturation in [0, 1], value in [0, 255]."""
    red, green, blue = rgb
    value = np.maximum(np.maximum(red, green), blue)
    chroma = value - np.minimum(np.minimum(red, green), blue)
    safe = np.where(chroma > 0, chroma, 1)  # grey pixels: any hue, keep the division finite
    hue = np.where(value == red, (green - blue) / safe,
                   np.where(value == green, (blue - red) / safe + 2, (red - green) / safe + 4))
    saturation = chroma / np.where(value > 0, value, 1)
    return np.stack([_fraction(hue / 6), saturation, value])


def hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    """(3, ...) hue in [0, 1), saturation in [0, 1], value in [0, 255] -> (3, ...) RGB in [0, 255]."""
    hue, saturation, value = hsv[0:1], hsv[1:2], hsv[2:3]
    # Each channel n in (R, G, B) = (5, 3, 1) falls off along the hue circle from its own peak.
    peaks = np.array([5, 3, 1], dtype=hsv.dtype).reshape(3, *[1] * (hsv.ndim - 1))  # (3, 1, ...)
    k = 6 * _fraction(peaks / 6 + hue)  # (3, ...) = (n + 6 hue) mod 6
    return value * (1 - saturation * np.clip(np.minimum(k, 4 - k), 0, 1))


def choose_crop(label: np.ndarray, crop_size: int, rng: np.random.Generator) -> tuple[int, int]:
    """Top-left corner (top, left) of a random crop of (H, W) `label`, mmseg's cat_max_ratio rule:
    the window (crop_size square, or the whole side where the label is smaller) is re-drawn up
    to 10 times until at least two classes show and none covers 75% or more of its labelled
    pixels; the last draw is kept if none qualifies."""
    height, width = label.shape
    crop_h, crop_w = min(crop_size, height), min(crop_size, width)
    for _ in range(11):
        top, left = int(rng.integers(height - crop_h + 1)), int(rng.integers(width - crop_w + 1))
        window = label[top:top + crop_h, left:left + crop_w].ravel()  # (crop_h * crop_w,)
        counts = np.bincount(window, minlength=256)[:IGNORE]
        if np.count_nonzero(counts) > 1 and counts.max() < 0.75 * counts.sum():
            break
    return top, left


def random_resize_crop_flip(image: Image.Image, label: np.ndarray, rng: np.random.Generator,
                            crop_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Geometric part of the training augmentation: uint8 (h, w, 3) and (h, w), h, w <= crop_size.

    Resize so the short side is crop_size * k / 10 for k in 5..20 (long side at most
    4 * crop_size), image bilinear and label nearest; crop by `choose_crop`; flip with p 0.5.
    """
    width, height = image.size
    short = crop_size * int(rng.integers(5, 21)) // 10
    scale = min(short / min(width, height), 4 * crop_size / max(width, height))
    size = (int(width * scale + 0.5), int(height * scale + 0.5))
    resized = np.asarray(Image.fromarray(label).resize(size, Image.NEAREST))
    top, left = choose_crop(resized, crop_size, rng)
    bottom, right = top + min(crop_size, size[1]), left + min(crop_size, size[0])
    label = resized[top:bottom, left:right]
    # Resize only the window the crop keeps: Pillow's box gives the same pixels as resizing
    # the whole image and cropping, for a fraction of the work.
    step_x, step_y = width / size[0], height / size[1]
    box = (left * step_x, top * step_y, min(right * step_x, width), min(bottom * step_y, height))
    rgb = np.asarray(image.resize((right - left, bottom - top), Image.BILINEAR, box=box))
    if rng.random() < 0.5:
        rgb, label = rgb[:, ::-1], label[:, ::-1]
    return rgb, label


def photometric_distortion(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """mmseg's PhotoMetricDistortion on float32 (3, h, w) RGB in [0, 255] -> the same, distorted.

    Each step with p 0.5: brightness +-32, contrast x0.5-1.5 (first or last, at random),
    saturation x0.5-1.5 and hue +-18 (OpenCV's 0..180 hue units) in HSV.
    """
    if rng.random() < 0.5:
        image = np.clip(image + rng.uniform(-32, 32), 0, 255)
    contrast = rng.uniform(0.5, 1.5) if rng.random() < 0.5 else 1.0
    contrast_first = rng.random() < 0.5
    if contrast_first and contrast != 1.0:
        image = np.clip(image * contrast, 0, 255)
    saturation = rng.uniform(0.5, 1.5) if rng.random() < 0.5 else 1.0
    hue = int(rng.integers(-18, 19)) / 180 if rng.random() < 0.5 else 0.0
    if saturation != 1.0 or hue != 0.0:
        hsv = rgb_to_hsv(image)
        hsv[1] = np.minimum(hsv[1] * saturation, 1)
        hsv[0] = _fraction(hsv[0] + hue)
        image = hsv_to_rgb(hsv)
    if not contrast_first and contrast != 1.0:
        image = np.clip(image * contrast, 0, 255)
    return image


def pasta_sigma(height: int, width: int, alpha: float, k: float, beta: float) -> np.ndarray:
    """PASTA's noise spread per frequency, (H, W) in np.fft's layout: (alpha * |f| / |f|max)^k + beta.

    |f| is measured as PASTA's code lays the frequencies out: 0, 1, ..., then back down; for an
    even size the top frequency counts as 0 (its grid runs -(n/2 - 1)..0, 0..n/2 - 1).
    """
    def distance(n: int) -> np.ndarray:
        i = np.arange(n)
        return np.where(i <= n // 2, i, n - i) if n % 2 else np.where(i < n // 2, i, n - 1 - i)

    d = np.hypot(*np.meshgrid(distance(height), distance(width), indexing="ij"))
    return (alpha * d / d.max()) ** k + beta


def pasta(image: np.ndarray, rng: np.random.Generator, alpha: float = 3.0, k: float = 2.0,
          beta: float = 0.25) -> np.ndarray:
    """PASTA (Chattopadhyay et al., ICCV 2023) on uint8 (H, W, 3) RGB -> the same, perturbed.

    Every channel's Fourier amplitude is multiplied by noise drawn from N(1, sigma(f)) of
    `pasta_sigma`: fine detail, where synthetic images look synthetic, varies most; layout and
    colour (low frequencies) least. The noise is drawn for each frequency independently, as in
    PASTA's code, and the real part of the inverse transform is kept, so the output's spectrum
    is the input's times the real factor (n(f) + n(-f)) / 2: the phase is kept (up to sign where
    the factor is negative), and the mean colour in expectation. The result is clipped to 0..255.
    """
    spectrum = np.fft.fft2(image.astype(np.float64) / 255, axes=(0, 1))  # (H, W, 3)
    sigma = pasta_sigma(*image.shape[:2], alpha, k, beta)[..., None]
    noisy = spectrum * rng.normal(1.0, np.broadcast_to(sigma, spectrum.shape))
    out = np.fft.ifft2(noisy, axes=(0, 1)).real
    return (np.clip(out, 0, 1) * 255 + 0.5).astype(np.uint8)


def normalize(image: np.ndarray) -> np.ndarray:
    """(3, H, W) RGB in [0, 255] -> (3, H, W) float32, ImageNet-normalised."""
    return (image - np.float32(MEAN)[:, None, None]) / np.float32(STD)[:, None, None]


def train_transform(image: Image.Image, label: np.ndarray, rng: np.random.Generator, crop_size: int,
                    pasta_args: tuple[float, float, float] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole training augmentation: RGB image, (H, W) train ids -> (3, crop, crop) float32 and
    (crop, crop) int64, padded at the bottom and right with 0 (the mean colour) and 255 (ignore).
    `pasta_args`: (alpha, k, beta) to apply PASTA first, to the whole image, as its authors do."""
    if pasta_args is not None:
        image = Image.fromarray(pasta(np.asarray(image), rng, *pasta_args))
    rgb, label = random_resize_crop_flip(image, label, rng, crop_size)
    image = normalize(photometric_distortion(rgb.transpose(2, 0, 1).astype(np.float32), rng))  # (3, h, w)
    pad_h, pad_w = crop_size - label.shape[0], crop_size - label.shape[1]
    image = np.pad(image, ((0, 0), (0, pad_h), (0, pad_w)))
    label = np.pad(label, ((0, pad_h), (0, pad_w)), constant_values=IGNORE)
    return torch.from_numpy(image), torch.from_numpy(label.astype(np.int64))


def to_test_tensor(image: Image.Image | np.ndarray, size: tuple[int, int] | None) -> torch.Tensor:
    """RGB image (PIL or uint8 (H, W, 3)) -> float32 (3, h, w) normalised, at the test size.

    Bilinear resize keeping the aspect ratio, mmseg's keep_ratio rule for size (long, short):
    the factor is min(long / long side, short / short side). None keeps the image as is.
    """
    image = Image.fromarray(image) if isinstance(image, np.ndarray) else image
    if size is not None:
        width, height = image.size
        factor = min(size[0] / max(width, height), size[1] / min(width, height))
        image = image.resize((int(width * factor + 0.5), int(height * factor + 0.5)), Image.BILINEAR)
    return torch.from_numpy(normalize(np.asarray(image).transpose(2, 0, 1)))  # (H, W, 3) -> (3, H, W)


# --------------------------------------------------------------------------------- Dataset objects


class SegmentationDataset(Dataset):
    """Class names and colours, raw reads and the train / eval transforms. Subclasses provide
    `__len__`, `stem(index)` and `_load(index) -> (RGB PIL image, (H, W) uint8 train ids)`."""

    def __init__(self, *, name: str, classes: tuple[str, ...], train: bool, crop_size: int,
                 test_size: tuple[int, int] | None, pasta_args: tuple[float, float, float] | None = None) -> None:
        self.name, self.classes, self.palette = name, classes, palette_for(len(classes))
        self.train, self.crop_size, self.test_size, self.pasta_args = train, crop_size, test_size, pasta_args
        self.has_labels = True

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def read(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Raw sample at full resolution: RGB uint8 (H, W, 3) and train ids uint8 (H, W)."""
        image, label = self._load(index)
        return np.asarray(image), label

    def augment(self, index: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Training sample `index` augmented with `rng`: (3, crop, crop) float32, (crop, crop) int64."""
        return train_transform(*self._load(index), rng, self.crop_size, self.pasta_args)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor] | dict:
        """train: ((3, crop, crop) float32, (crop, crop) int64); else dict(image=(3, h, w) at
        test scale, label=(H, W) int64 at full resolution, name=file stem, index)."""
        if self.train:
            # DataLoader seeds torch per worker, so drawing the numpy seed from torch keeps
            # workers distinct; train.py passes its own per-sample seeds to `augment` instead.
            return self.augment(index, np.random.default_rng(int(torch.randint(2**62, ()).item())))
        image, label = self._load(index)
        return dict(image=to_test_tensor(image, self.test_size), label=torch.from_numpy(label.astype(np.int64)),
                    name=self.stem(index), index=index)


class FileDataset(SegmentationDataset):
    """Image files paired with label files (None where the split publishes no labels) whose raw
    values map to train ids through `table` = (lut, known) of `label_table`. Values the dataset
    does not define become 255, are counted in `unknown_pixels` and warned about once."""

    def __init__(self, *, pairs: list[tuple[Path, Path | None]], table: tuple[np.ndarray, np.ndarray],
                 first_channel: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        self.pairs, (self.lut, self.known), self.first_channel = pairs, table, first_channel
        self.has_labels = all(label is not None for _, label in pairs)
        self.unknown_pixels = 0

    def __len__(self) -> int:
        return len(self.pairs)

    def stem(self, index: int) -> str:
        return self.pairs[index][0].stem

    def _load(self, index: int) -> tuple[Image.Image, np.ndarray]:
        image_path, label_path = self.pairs[index]
        image = read_rgb(image_path)
        if label_path is None:
            return image, np.full(image.size[::-1], IGNORE, dtype=np.uint8)
        raw = _read_label(label_path, first_channel=self.first_channel)
        if raw.shape != image.size[::-1]:
            turned = _open(image_path).getexif().get(ORIENTATION, 1) != 1
            raise ValueError(f"label {label_path} is {raw.shape[1]}x{raw.shape[0]} but image {image_path} is "
                             f"{image.size[0]}x{image.size[1]}" + (" as shown, turned by its EXIF orientation tag; "
                             "label the picture as a viewer shows it" if turned else ""))
        return image, self._map(raw, label_path)

    def _map(self, raw: np.ndarray, path: Path) -> np.ndarray:
        """(H, W) raw values -> (H, W) uint8 train ids, counting values the dataset does not define."""
        wide = 0
        if raw.dtype != np.uint8:  # 16-bit files: values past the table are unknown too
            over = (raw < 0) | (raw > 255)
            wide = int(np.count_nonzero(over))
            raw = np.where(over, 255, raw).astype(np.uint8)
        values = Image.fromarray(raw)
        counts = np.array(values.histogram())  # Pillow counts and maps in C, several times faster than numpy
        counts[255] -= wide  # the stand-ins for values past the table are counted apart
        unknown = counts * ~self.known
        total = int(unknown.sum()) + wide
        if total and not self.unknown_pixels:
            shown = np.flatnonzero(unknown).tolist() + (["> 255"] if wide else [])
            warnings.warn(f"{path}: {total} pixels hold label values {shown} that {self.name} does "
                          "not define; they are ignored (255). Later ones are only counted in "
                          "dataset.unknown_pixels.", stacklevel=2)
        self.unknown_pixels += total
        return np.asarray(values.point(self.lut.tolist()))


class CombinedDataset(ConcatDataset):
    """Several datasets with the same classes read as one, e.g. gta+synthia (Table 4)."""

    def __init__(self, datasets: list[SegmentationDataset], *, name: str) -> None:
        first = datasets[0]
        for other in datasets[1:]:
            if other.classes != first.classes:
                raise ValueError(f"cannot combine {first.name} ({first.num_classes} classes) with "
                                 f"{other.name} ({other.num_classes} classes): class lists differ")
        super().__init__(datasets)
        self.name, self.classes, self.palette, self.num_classes = name, first.classes, first.palette, first.num_classes
        self.has_labels = all(d.has_labels for d in datasets)

    @property
    def unknown_pixels(self) -> int:
        return sum(getattr(d, "unknown_pixels", 0) for d in self.datasets)

    def member(self, index: int) -> tuple[SegmentationDataset, int]:
        """The member dataset that holds `index`, and the index within it."""
        member = bisect.bisect_right(self.cumulative_sizes, index)
        return self.datasets[member], index - ([0] + self.cumulative_sizes)[member]

    def read(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        dataset, index = self.member(index)
        return dataset.read(index)

    def stem(self, index: int) -> str:
        dataset, index = self.member(index)
        return dataset.stem(index)

    def augment(self, index: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        dataset, index = self.member(index)
        return dataset.augment(index, rng)


# --------------------------------------------------- Dataset names, the command-line form, the builder


DATA_ROOTS = {
    "gta": "data/gta", "synthia": "data/synthia", "cityscapes": "data/cityscapes",
    "bdd": "data/bdd100k", "mapillary": "data/mapillary", "acdc": "data/acdc",
}
# Test-time size (long, short), fitted keeping the aspect ratio; missing means no resize.
TEST_SIZES = {
    "cityscapes": (1024, 512), "mapillary": (1024, 512), "gta": (1024, 512),
    "synthia": (1024, 512), "bdd": (1280, 720), "acdc": (960, 540),
}
ACDC_CONDITIONS = ("fog", "night", "rain", "snow")
SYNTHETIC_DOMAINS = ("game", "photo", "fog", "night", "rain")
SUBSETS = {"acdc": ACDC_CONDITIONS, "synthetic": SYNTHETIC_DOMAINS}
# GTAV and Synthia ship no split: the paper trains on every image, and `val` reads them too.
SPLITS = {
    "gta": ("train", "val"), "synthia": ("train", "val"), "cityscapes": ("train", "val", "test"),
    "bdd": ("train", "val"), "mapillary": ("train", "val"), "acdc": ("train", "val", "test"),
    "synthetic": ("train", "val", "test"), "folder": ("train", "val", "test"),
}
# How many synthetic scenes each split has.
SYNTHETIC_LENGTH = {"train": 1000, "val": 20, "test": 20}


def _valid_names() -> str:
    """Every accepted dataset name, for error messages."""
    return ", ".join(f"{n}[:{'|'.join(SUBSETS[n])}]" if n in SUBSETS else n for n in SPLITS) + \
        " (join training sources with +, e.g. gta+synthia)"


def _split_name(name: str) -> list[tuple[str, str | None]]:
    """'gta+acdc:night' -> [('gta', None), ('acdc', 'night')], checking every part."""
    parts = []
    for part in name.split("+"):
        base, _, subset = part.strip().partition(":")
        if base not in SPLITS:
            raise ValueError(f"unknown dataset {base!r} in {name!r}; valid: {_valid_names()}")
        if subset and subset not in SUBSETS.get(base, ()):
            options = ", ".join(SUBSETS.get(base, ())) or "none"
            raise ValueError(f"unknown subset {subset!r} of {base} in {name!r}; valid subsets: {options}")
        parts.append((base, subset or None))
    return parts


def parse_data(text: str) -> list[tuple[str, str | None]]:
    """'gta+synthia,cityscapes=/d/cs,folder=my/data' -> [(name, root or None), ...]."""
    entries = []
    for entry in text.split(","):
        name, has_root, root = (piece.strip() for piece in entry.partition("="))
        if not name:
            raise ValueError(f"empty dataset name in {text!r}; expected NAME[=ROOT],... with NAME in "
                             f"{_valid_names()}")
        if has_root and not root:
            raise ValueError(f"{entry.strip()!r} in {text!r} has '=' but no folder after it")
        parts = _split_name(name)
        if not root and any(base == "folder" for base, _ in parts):
            raise ValueError(f"the folder dataset needs its path: folder=PATH (in {text!r})")
        entries.append((name, root or None))
    return entries


def first_source(text: str) -> str:
    """The dataset of the first training source in a --data value: 'gta+synthia=/a+/b' -> 'gta'."""
    name = parse_data(text)[0][0]
    return _split_name(name)[0][0]


def dataset_kwargs(name: str, split: str, run_args: dict) -> dict:
    """Synthetic scenes as a run drew them: twice as wide as its crop, from its seed; and PASTA on
    the training split of a run with --augment pasta."""
    kwargs = {}
    if name.startswith("synthetic"):
        crop = run_args.get("crop_size", 512)
        kwargs = dict(image_size=(2 * crop, crop), length=SYNTHETIC_LENGTH[split], seed=run_args.get("seed", 0))
    if split == "train" and run_args.get("augment") == "pasta":
        kwargs["pasta_args"] = tuple(run_args[f"pasta_{p}"] for p in ("alpha", "k", "beta"))
    return kwargs


def build_dataset(name: str, root: str | Path | None, split: str, *, train: bool, crop_size: int = 512,
                  image_size: tuple[int, int] = (512, 256), length: int = 200, seed: int = 0,
                  pasta_args: tuple[float, float, float] | None = None) -> SegmentationDataset | CombinedDataset:
    """Dataset `name` (see the module docstring) at `root` (None: DATA_ROOTS) for `split`.

    train: samples are augmented random crops (crop_size square), after PASTA with `pasta_args`
    = (alpha, k, beta) if given; otherwise evaluation dicts.
    image_size (width, height), length and seed describe the synthetic dataset only.
    A '+' name joins sources; its root is None or one folder per source joined by '+'.
    """
    parts = _split_name(name)
    if crop_size < 1 or min(image_size) < 1 or length < 1:
        raise ValueError(f"crop_size, image_size and length must be positive, got {crop_size}, "
                         f"{image_size}, {length}")
    if len(parts) > 1:
        roots = [None] * len(parts) if root is None else str(root).split("+")
        if len(roots) != len(parts):
            raise ValueError(f"{name!r} joins {len(parts)} datasets, so root must be None (the defaults) "
                             f"or {len(parts)} folders joined by '+', got {root!r}")
        members = [build_dataset(f"{b}:{s}" if s else b, r or None, split, train=train, crop_size=crop_size,
                                 image_size=image_size, length=length, seed=seed, pasta_args=pasta_args)
                   for (b, s), r in zip(parts, roots)]
        return CombinedDataset(members, name=name)
    base, subset = parts[0]
    if split not in SPLITS[base]:
        raise ValueError(f"{base} has splits {', '.join(SPLITS[base])}; got {split!r}")
    if base == "synthetic":
        if root is not None:
            raise ValueError(f"the synthetic dataset is generated and takes no root, got {root!r}")
        members = [SyntheticDataset(domain=domain, split=split, length=length, image_size=tuple(image_size),
                                    seed=seed, train=train, crop_size=crop_size, pasta_args=pasta_args)
                   for domain in ([subset] if subset else SYNTHETIC_DOMAINS)]
        return members[0] if subset else CombinedDataset(members, name="synthetic")
    if root is None and base == "folder":
        raise ValueError("the folder dataset needs a root: folder=PATH")
    root = Path(root if root is not None else DATA_ROOTS[base]).expanduser()
    found = LAYOUTS[base](root, split, subset)
    if train and any(label is None for _, label in found["pairs"]):
        raise ValueError(f"{base} publishes no labels for its {split} split; it cannot be used for training")
    return FileDataset(**{"classes": CITYSCAPES_CLASSES} | found, name=str(root) if base == "folder" else name,
                       train=train, crop_size=crop_size, test_size=TEST_SIZES.get(base), pasta_args=pasta_args)


# ---------------------------------------- Each dataset's files, laid out as its release ships them


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
LABEL_SUFFIXES = (".png", ".bmp", ".tif", ".tiff")
ORIENTATION = 0x0112  # the EXIF tag of how a camera held the picture


def _expect(root: Path, name: str, folders: list[str]) -> None:
    """Fail with the expected layout unless every folder exists under root."""
    expected = " and ".join(folders)
    if not root.is_dir():
        raise FileNotFoundError(f"{name} root {root} is not an existing folder; expected {expected} under it "
                                f"(pass the dataset's folder as {name}=PATH)")
    missing = [folder for folder in folders if not (root / folder).is_dir()]
    if missing:
        found = sorted(p.name for p in root.iterdir())[:20]
        raise FileNotFoundError(f"expected {expected} under {root} for {name}, but "
                                f"{', '.join(missing)} is missing (found: {found or 'nothing'})")


def _pairs(images: list[Path], labels_for, where: str, name: str, split: str = "train",
           root: Path | None = None) -> dict:
    """Each image with its label file, and the table to read the labels: FileDataset's arguments.

    labels_for(image) gives the candidate label paths in order of preference (raw ids first,
    then converted train ids); the first candidate that any image has is used for all. A
    test split publishes no labels. `where` describes the search, for errors.
    """
    if not images:
        raise ValueError(f"no images found: {where}")
    if split == "test":
        return dict(pairs=[(image, None) for image in images], table=label_table(name, root))
    for option in range(len(labels_for(images[0]))):
        labels = [labels_for(image)[option] for image in images]
        found = [label.is_file() for label in labels]
        if any(found):
            break
    missing = [image for image, ok in zip(images, found) if not ok]
    if missing:
        names = ", ".join(image.name for image in missing[:10]) + (" ..." if len(missing) > 10 else "")
        raise FileNotFoundError(f"{len(missing)} of {len(images)} images have no label file "
                                f"(expected e.g. {labels[found.index(False)]}): {names}")
    # Synthia's raw label files keep the class in the first channel of a 16-bit colour PNG.
    return dict(pairs=list(zip(images, labels)), table=label_table("trainids" if option else name, root),
                first_channel=name == "synthia" and not option)


def _gta_files(root: Path, split: str, subset: str | None) -> dict:
    _expect(root, "gta", ["images", "labels"])
    return _pairs(sorted((root / "images").glob("*.png")), lambda p: (
        root / "labels" / p.name, root / "labels" / f"{p.stem}_labelTrainIds.png"), f"{root}/images/*.png", "gta")


def _synthia_files(root: Path, split: str, subset: str | None) -> dict:
    _expect(root, "synthia", ["RGB", "GT/LABELS"])
    labels = root / "GT" / "LABELS"
    return _pairs(sorted((root / "RGB").glob("*.png")), lambda p: (
        labels / p.name, labels / f"{p.stem}_labelTrainIds.png"), f"{root}/RGB/*.png", "synthia")


def _cityscapes_files(root: Path, split: str, subset: str | None) -> dict:
    _expect(root, "cityscapes", [f"leftImg8bit/{split}"] + ([] if split == "test" else [f"gtFine/{split}"]))

    def labels_for(image: Path) -> tuple[Path, ...]:
        base = root / "gtFine" / split / image.parent.name / image.name.removesuffix("_leftImg8bit.png")
        return Path(f"{base}_gtFine_labelIds.png"), Path(f"{base}_gtFine_labelTrainIds.png")

    return _pairs(sorted((root / "leftImg8bit" / split).glob("*/*_leftImg8bit.png")), labels_for,
                  f"{root}/leftImg8bit/{split}/CITY/*_leftImg8bit.png", "cityscapes", split)


def _bdd_files(root: Path, split: str, subset: str | None) -> dict:
    masks = root / "labels" / "sem_seg" / "masks" / split
    _expect(root, "bdd", [f"images/10k/{split}", f"labels/sem_seg/masks/{split}"])
    return _pairs(sorted((root / "images" / "10k" / split).glob("*.jpg")), lambda p: (masks / f"{p.stem}.png",),
                  f"{root}/images/10k/{split}/*.jpg", "bdd")


def _mapillary_files(root: Path, split: str, subset: str | None) -> dict:
    folder = {"train": "training", "val": "validation"}[split]
    labels = root / folder / "v1.2" / "labels"
    if not labels.is_dir() and (root / folder / "labels").is_dir():
        labels = root / folder / "labels"  # releases before v1.2
    _expect(root, "mapillary", [f"{folder}/images", str(labels.relative_to(root))])
    return _pairs(sorted((root / folder / "images").glob("*.jpg")), lambda p: (labels / f"{p.stem}.png",),
                  f"{root}/{folder}/images/*.jpg", "mapillary", root=root)


def _acdc_files(root: Path, split: str, subset: str | None) -> dict:
    conditions = (subset,) if subset else ACDC_CONDITIONS
    folders = [f"rgb_anon/{c}/{split}" for c in conditions]
    _expect(root, "acdc", folders + ([] if split == "test" else [f"gt/{c}/{split}" for c in conditions]))
    images = sorted(p for c in conditions for p in (root / "rgb_anon" / c / split).glob("*/*_rgb_anon.png"))

    def labels_for(image: Path) -> tuple[Path, ...]:
        condition, sequence = image.parents[2].name, image.parent.name
        base = root / "gt" / condition / split / sequence / image.name.removesuffix("_rgb_anon.png")
        return Path(f"{base}_gt_labelIds.png"), Path(f"{base}_gt_labelTrainIds.png")

    return _pairs(images, labels_for, f"{root}/rgb_anon/COND/{split}/SEQ/*_rgb_anon.png", "acdc", split)


def _folder_classes(root: Path) -> tuple[str, ...]:
    """Class names from root/classes.txt (one per line), else class_0..class_{K-1} for label
    values 0..K-1 found over every label file under root/labels.

    Without classes.txt, label values that cannot be meant as 0..K-1 are refused with what
    they probably mean: a 0/255 binary mask (255 is "ignore" here), a single class, or ids
    with gaps (a stray value would otherwise make a model of that many classes).
    """
    _expect(root, "folder", ["images", "labels"])
    files = sorted(p for p in (root / "labels").rglob("*") if p.suffix.lower() in LABEL_SUFFIXES)
    if not files:
        raise ValueError(f"no label files ({', '.join(LABEL_SUFFIXES)}) under {root / 'labels'}")
    found = set()
    for path in files:
        found |= set(np.unique(_read_label(path, first_channel=False)).tolist())
    values = sorted(v for v in found if v != IGNORE)
    names_file = root / "classes.txt"
    if names_file.is_file():
        try:
            names = tuple(line.strip() for line in names_file.read_text(encoding="utf-8").splitlines() if line.strip())
        except UnicodeDecodeError as e:
            raise ValueError(f"{names_file} is not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8, "
                             f"one class name per line") from None
        if not 2 <= len(names) <= 255:
            raise ValueError(f"{names_file} lists {len(names)} class names; expected 2..255, one per line "
                             f"(a binary task has two: e.g. background and the object)")
        unnamed = [v for v in values if v >= len(names)]
        if unnamed:
            raise ValueError(f"the labels under {root / 'labels'} hold the values {unnamed[:10]}, but {names_file} "
                             f"names {len(names)} classes (values 0..{len(names) - 1}); add their names, or set "
                             f"those pixels to 255 (ignore)")
        return names
    fix = f"renumber the classes 0..K-1 (255 = ignore), or list their names in {names_file}"
    if not values:
        raise ValueError(f"every label pixel under {root / 'labels'} is 255 (ignore); expected class ids 0..K-1")
    if values == [0] and IGNORE in found:
        raise ValueError(f"the labels under {root / 'labels'} hold only 0 and 255: binary masks with 255 as the "
                         f"object? Here 255 means 'ignore', so nothing would be learnt. Save the object as 1 "
                         f"(e.g. mask // 255) and the background as 0")
    if len(values) == 1:
        raise ValueError(f"the labels under {root / 'labels'} hold one class only (value {values[0]}): there is "
                         f"nothing to tell apart; {fix}")
    if len(values) != values[-1] + 1:
        missing = sorted(set(range(values[-1] + 1)) - set(values))
        raise ValueError(f"the labels under {root / 'labels'} hold the values {values[:20]}, so a model of "
                         f"{values[-1] + 1} classes would be built, but {len(missing)} ids never occur "
                         f"({missing[:10]}{' ...' if len(missing) > 10 else ''}); a stray value is a wrong pixel: "
                         f"set it to 255 (ignore), or {fix}")
    return tuple(f"class_{i}" for i in range(len(values)))


def _folder_files(root: Path, split: str, subset: str | None) -> dict:
    _expect(root, "folder", ["images", "labels"])
    image_dir, label_dir = root / "images" / split, root / "labels" / split
    if image_dir.is_dir():
        _expect(root, "folder", [f"images/{split}", f"labels/{split}"])
    elif any((root / "images" / s).is_dir() for s in SPLITS["folder"]):
        raise FileNotFoundError(f"{root / 'images'} is split into sub-folders but has no {split}/; "
                                f"expected images/{split} and labels/{split} under {root}")
    else:
        image_dir, label_dir = root / "images", root / "labels"
    images = sorted(p for p in image_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and not p.is_dir())
    found = sorted(label_dir.rglob("*"), key=lambda p: p.suffix.lower() == ".png")  # a .png wins a tie
    labels = {p.relative_to(label_dir).with_suffix(""): p for p in found if p.suffix.lower() in LABEL_SUFFIXES}

    def labels_for(image: Path) -> tuple[Path, ...]:
        key = image.relative_to(image_dir).with_suffix("")
        return (labels.get(key, label_dir / key.with_suffix(".png")),)

    classes = _folder_classes(root)
    return _pairs(images, labels_for, f"{image_dir} holds no {'/'.join(IMAGE_SUFFIXES)} files", "trainids") | \
        dict(table=label_table("folder", num_classes=len(classes)), classes=classes)


LAYOUTS = {
    "gta": _gta_files, "synthia": _synthia_files, "cityscapes": _cityscapes_files, "bdd": _bdd_files,
    "mapillary": _mapillary_files, "acdc": _acdc_files, "folder": _folder_files,
}


# ------------------------------------------------------------------- Reading image and label files


def _open(path: Path, *, low_byte: bool = False) -> Image.Image:
    """Decode an image file completely; errors name the file. `low_byte`: see _read_label."""
    try:
        image = Image.open(path)
        if low_byte:
            # Pillow keeps only the high byte of 16-bit colour PNGs; unpacking the same
            # big-endian data as little-endian makes it keep the low byte instead.
            image.tile = [(decoder, extents, offset, args.replace(";16B", ";16L"))
                          for decoder, extents, offset, args in image.tile]
        image.load()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist") from None
    except (OSError, SyntaxError, ValueError) as error:  # Pillow's errors for corrupt or truncated files
        raise ValueError(f"cannot read image {path}: {error}") from error
    return image


def read_rgb(path: Path) -> Image.Image:
    """An image file as a viewer shows it, in 8-bit RGB: turned as its EXIF orientation says, and
    16-bit grey scaled to 0..255 (converting it would clip every value over 255 to white)."""
    image = ImageOps.exif_transpose(_open(path))
    if image.mode.startswith("I"):  # 16-bit grey, which Pillow holds as 32-bit integers
        image = Image.fromarray((np.asarray(image, dtype=np.float32) / 257).round().clip(0, 255).astype(np.uint8))
    return image.convert("RGB")


def _read_label(path: Path, *, first_channel: bool) -> np.ndarray:
    """(H, W) raw label values, uint8 or wider for 16-bit files. first_channel: take the first
    channel of a colour file (Synthia's 16-bit PNGs keep the class there); else colour is an error."""
    image = _open(path)
    if image.mode in ("L", "P", "1") or image.mode.startswith("I"):
        return np.asarray(image).astype(np.uint8) if image.mode == "1" else np.asarray(image)
    if not first_channel:
        raise ValueError(f"label file {path} has {image.mode} pixels; expected one channel of class "
                         "ids (an 8-bit grey or palette PNG)")
    high = np.asarray(image)[..., 0]
    with open(path, "rb") as file:
        head = file.read(25)  # a PNG's bit depth is byte 24, inside its IHDR chunk
    if head[:8] != b"\x89PNG\r\n\x1a\n" or len(head) < 25 or head[24] != 16:
        return high
    low = np.asarray(_open(path, low_byte=True))[..., 0]
    return (high.astype(np.uint16) << 8) | low


# -------------------------------------------------------------- The synthetic multi-domain dataset

# A straight street seen from a car, in units of the camera height (about 1.5 m): road,
# sidewalks and verges, facades of buildings, walls and trees, then objects painted far to
# near. The layout depends on (seed, split, index) only; the domain decides colours,
# texture, fog, darkness and rain.

(ROAD, SIDEWALK, BUILDING, WALL, FENCE, POLE, LIGHT, SIGN, VEGETATION, TERRAIN, SKY, PERSON,
 RIDER, CAR, TRUCK, BUS, TRAIN, MOTORCYCLE, BICYCLE) = range(19)
MARKING, WINDOW, LAMP = range(19, 22)  # materials that change the colour, not the class
GAME_COLOURS = np.array([  # flat, saturated, "rendered by a game engine"
    (110, 100, 125), (225, 200, 170), (200, 120, 90), (160, 160, 200), (210, 170, 110), (90, 90, 95),
    (40, 40, 40), (245, 220, 0), (60, 185, 60), (175, 215, 90), (120, 190, 255), (220, 60, 60), (250, 120, 0),
    (30, 80, 220), (200, 200, 215), (250, 200, 40), (180, 40, 40), (40, 40, 160), (170, 40, 130),
    (250, 250, 250), (130, 210, 245), (255, 250, 200)], dtype=np.float32)
PHOTO_COLOURS = np.array([  # muted, like a camera in daylight
    (82, 80, 84), (150, 146, 140), (140, 128, 116), (165, 160, 150), (120, 108, 92), (110, 110, 104),
    (35, 35, 30), (200, 195, 185), (70, 98, 42), (122, 128, 74), (175, 200, 225), (72, 66, 80), (62, 60, 70),
    (105, 105, 112), (170, 170, 165), (180, 160, 70), (130, 50, 45), (52, 50, 56), (62, 60, 72),
    (215, 215, 205), (62, 76, 92), (255, 240, 190)], dtype=np.float32)
# Per material: how much instances' colours differ (objects and facades a lot, road and sky
# little), and the strength of the texture outside the game domain.
JITTER = np.array([12, 14, 60, 40, 40, 12, 6, 45, 18, 18, 14, 80, 80, 90, 60, 60, 40, 60, 60, 6, 15, 5], np.float32)
TEXTURE = np.array([14, 14, 9, 12, 10, 5, 3, 3, 32, 26, 8, 5, 5, 4, 5, 5, 5, 5, 5, 6, 6, 2], np.float32)
# Objects on the ground: class, width and height ranges, superellipse power (2: an ellipse,
# 16: a box) and a band of windows (bottom, top) in fractions of the height.
OBJECTS = {
    "car": (CAR, (1.1, 1.35), (0.85, 1.15), 5, (0.55, 0.9)), "truck": (TRUCK, (1.55, 1.75), (1.9, 2.6), 16, None),
    "bus": (BUS, (1.65, 1.8), (2.0, 2.3), 10, (0.5, 0.85)), "person": (PERSON, (0.3, 0.45), (1.0, 1.3), 3, None),
    "bicycle": (BICYCLE, (0.9, 1.2), (0.45, 0.6), 2, None), "motorcycle": (MOTORCYCLE, (1.2, 1.5), (0.55, 0.7), 2, None),
}


class Scene:
    """The instance and depth maps of one street being painted, each instance's class and
    material, and the camera: focal length and horizon row in pixels, vanishing point column."""

    def __init__(self, rng: np.random.Generator, width: int, height: int) -> None:
        self.focal = np.float32(width * rng.uniform(0.5, 0.8))
        self.horizon, self.centre = height * rng.uniform(0.36, 0.5), width * rng.uniform(0.35, 0.65)
        self.instance = np.zeros((height, width), dtype=np.uint16)  # instance 0 is the sky
        self.depth = np.full((height, width), 1000, dtype=np.float32)
        self.classes, self.materials = [SKY], [SKY]

    def new(self, cls: int, material: int | None = None) -> int:
        self.classes.append(cls)
        self.materials.append(cls if material is None else material)
        return len(self.classes) - 1

    def paint(self, instance: int, x0: float, x1: float, h0: float, h1: float, z: float, power: float = 16) -> None:
        """Fill the world box [x0, x1] (lateral) x [h0, h1] (height) at depth z with the
        superellipse |u|^power + |v|^power <= 1."""
        left, right = self.centre + self.focal * x0 / z, self.centre + self.focal * x1 / z
        top, bottom = self.horizon + self.focal * (1 - h1) / z, self.horizon + self.focal * (1 - h0) / z
        c0, c1 = max(round(left), 0), min(round(right), self.instance.shape[1])
        r0, r1 = max(round(top), 0), min(round(bottom), self.instance.shape[0])
        u = np.abs((np.arange(c0, c1) + 0.5 - left) / (right - left) * 2 - 1) ** power  # (w,)
        v = np.abs((np.arange(r0, r1) + 0.5 - top) / (bottom - top) * 2 - 1) ** power  # (h,)
        inside = v[:, None] + u <= 1  # (h, w)
        self.instance[r0:r1, c0:c1][inside], self.depth[r0:r1, c0:c1][inside] = instance, z

    def object(self, rng: np.random.Generator, kind: str, x: float, z: float, base: float = 0,
               cls: int | None = None) -> None:
        """One of OBJECTS centred at lateral position x and depth z, standing on height `base`; `cls`
        overrides its class (a rider has a person's shape)."""
        own, width, height, power, windows = OBJECTS[kind]
        w, h = rng.uniform(*width), rng.uniform(*height)
        self.paint(self.new(own if cls is None else cls), x - w / 2, x + w / 2, base, base + h, z, power)
        if windows:
            bottom, top = base + windows[0] * h, base + windows[1] * h
            self.paint(self.new(own, WINDOW), x - 0.38 * w, x + 0.38 * w, bottom, top, z, 6)

    def pole(self, rng: np.random.Generator, x: float, z: float) -> None:
        """A pole, bare or carrying a traffic sign (diamond, disc or plate) or a traffic light."""
        top, kind = rng.uniform(2.5, 4.5), rng.integers(3)
        self.paint(self.new(POLE), x - 0.045, x + 0.045, 0, top, z)
        if kind == 1:
            size = rng.uniform(0.35, 0.6)
            self.paint(self.new(SIGN), x - size / 2, x + size / 2, top - size, top, z, float(rng.choice([1, 2, 16])))
        elif kind == 2:
            self.paint(self.new(LIGHT), x - 0.13, x + 0.13, top - 0.75, top, z)
            lamp = top - 0.72 + 0.24 * rng.integers(3)  # the lit one of three lamps
            self.paint(self.new(LIGHT, LAMP), x - 0.08, x + 0.08, lamp, lamp + 0.16, z, 2)


def draw_facades(scene: Scene, rng: np.random.Generator, rows: np.ndarray, cols: np.ndarray,
                 line: np.ndarray) -> None:
    """Facades at lateral distance `line` (left, right), 16 segments along the street on each side:
    buildings with windows (kind 0), trees (1), or a wall or fence with trees behind (2)."""
    side = (cols > 0).astype(np.intp)                     # (W,) 0 left, 1 right
    reach = np.abs(cols) / line[side]                      # (W,) rows from the horizon down to the facade's foot
    depth = scene.focal / np.maximum(reach, 1e-3)          # (W,) the facade's depth in each column
    ends = np.cumsum(rng.uniform(5, 25, (2, 16)), axis=1)
    segment = np.where(side, np.searchsorted(ends[1], depth), np.searchsorted(ends[0], depth)).clip(max=15)
    kinds = rng.choice(3, (2, 16), p=(0.6, 0.25, 0.15))
    tops = np.where(kinds == 0, rng.uniform(3, 14, (2, 16)), rng.uniform(2.5, 5.5, (2, 16)))
    walls = np.where(kinds == 2, rng.uniform(0.6, 1.2, (2, 16)), tops)  # where a wall gives way to trees
    ids = np.zeros((3, 2, 16), dtype=np.uint16)  # per segment: lower part, upper part, windows
    for s, k in np.ndindex(2, 16):
        lower = scene.new((BUILDING, VEGETATION, int(rng.choice([WALL, FENCE])))[kinds[s, k]])
        ids[:, s, k] = lower, scene.new(VEGETATION) if kinds[s, k] == 2 else lower, scene.new(BUILDING, WINDOW)
    kind, top, wall = kinds[side, segment], tops[side, segment], walls[side, segment]  # (W,)
    lower, upper, windows = ids[:, side, segment]
    height = 1 - rows * depth / scene.focal  # (H, W) height above the ground where each pixel meets the facade
    trees = np.where(kind > 0, 0.6 * np.abs(np.sin(0.9 * depth + rng.uniform(0, 6))), 0)  # uneven crowns
    facade = (height > 0) & (height <= top + trees)
    floor = _fraction(height / rng.uniform(1.8, 2.4))  # windows: floors up the facade, bays along the street
    bay = _fraction(depth / rng.uniform(1.8, 3.0) + rng.uniform())
    glass = (kind == 0) & (bay < 0.55) & (floor > 0.35) & (floor < 0.8) & (height > 1.4) & (height < top - 0.4)
    scene.instance[:] = np.where(facade, np.where(glass, windows, np.where(height > wall, upper, lower)), 0)
    scene.depth[:] = np.where(facade, depth, scene.depth)


def draw_ground(scene: Scene, rng: np.random.Generator, rows: np.ndarray, cols: np.ndarray, road: np.ndarray,
                walk: np.ndarray, line: np.ndarray) -> None:
    """Below the horizon, bands of lateral distance up to the facades: road, sidewalk, grass;
    a dashed centre line on most roads."""
    first = int(np.searchsorted(rows[:, 0], 0, side="right"))  # the first row under the horizon
    depth = scene.focal / rows[first:]                          # (Hg, 1)
    lateral = cols / rows[first:]                               # (Hg, W) signed distance from the camera
    side, distance = (cols > 0).astype(np.intp), np.abs(lateral)
    road_id, marking = scene.new(ROAD), scene.new(ROAD, MARKING)
    walks, verges = np.array([[scene.new(c), scene.new(c)] for c in (SIDEWALK, TERRAIN)], np.uint16)[:, side]
    band = np.where(distance <= road[side], road_id, np.where(distance <= walk[side], walks, verges))
    if rng.random() < 0.8:
        dashes = _fraction(depth / rng.uniform(3, 6) + rng.uniform()) < 0.5  # (Hg, 1)
        band = np.where((np.abs(lateral - (road[1] - road[0]) / 2) < 0.06) & dashes, marking, band)
    ground = distance <= line[side]
    scene.instance[first:] = np.where(ground, band, scene.instance[first:])
    scene.depth[first:] = np.where(ground, depth, scene.depth[first:])


def draw_objects(scene: Scene, rng: np.random.Generator, road: np.ndarray, walk: np.ndarray) -> None:
    """Vehicles on the road, people on the sidewalks, two-wheelers ridden or parked, poles along
    both kerbs; painted far to near, so that nearer ones cover farther ones."""
    objects = []  # (depth, lateral position, what)
    for _ in range(rng.integers(1, 8)):
        vehicle = str(rng.choice(["car", "truck", "bus"], p=(0.8, 0.12, 0.08)))
        objects.append((rng.uniform(4, 70), rng.uniform(-road[0] + 0.7, road[1] - 0.7), vehicle))
    for _ in range(rng.integers(0, 7)):
        s = rng.integers(2)
        objects.append((rng.uniform(3, 50), (2 * s - 1) * rng.uniform(road[s] + 0.3, walk[s] - 0.2), "person"))
    for _ in range(rng.integers(0, 3)):
        two_wheeler, s = str(rng.choice(["bicycle", "motorcycle"])), rng.integers(2)
        if rng.random() < 0.7:  # ridden on the road
            objects.append((rng.uniform(4, 40), rng.uniform(-road[0] + 0.8, road[1] - 0.8), two_wheeler + "+rider"))
        else:  # parked mid-sidewalk
            objects.append((rng.uniform(4, 40), (2 * s - 1) * (road[s] + walk[s]) / 2, two_wheeler))
    for s in range(2):
        objects += [(z, (2 * s - 1) * (road[s] + 0.25), "pole") for z in np.cumsum(rng.uniform(10, 30, 6)) - 6]
    for z, x, what in sorted(objects, key=lambda o: -o[0]):
        if what == "pole":
            scene.pole(rng, x, z)
        elif what.endswith("+rider"):
            scene.object(rng, what.removesuffix("+rider"), x, z)
            scene.object(rng, "person", x, z, base=0.4, cls=RIDER)
        else:
            scene.object(rng, what, x, z)


def draw_scene(rng: np.random.Generator, width: int,
               height: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Lay out one street scene: instance (H, W) uint16, each instance's class (N,) and
    material (N,), and the depth (H, W) float32 of every pixel in camera heights."""
    f32 = np.float32  # float64 maps would double the memory traffic
    scene = Scene(rng, width, height)
    road = rng.uniform(1.5, 3.5, 2).astype(f32)          # road edge, left and right of the camera
    walk = road + rng.uniform(0.8, 2.2, 2).astype(f32)   # outer edge of each sidewalk
    line = walk + np.where(rng.random(2) < 0.35, rng.uniform(0.5, 2.0, 2), 0).astype(f32)  # facades; grass between
    rows = (np.arange(height, dtype=f32) + 0.5 - f32(scene.horizon))[:, None]  # (H, 1) below the horizon
    cols = np.arange(width, dtype=f32) + 0.5 - f32(scene.centre)               # (W,) right of centre
    draw_facades(scene, rng, rows, cols, line)
    draw_ground(scene, rng, rows, cols, road, walk, line)
    if rng.random() < 0.6:  # the street ends at a cross block
        end, rise = rng.uniform(40, 150), rng.uniform(3, 10)
        block = (scene.depth > end) & (rows >= -(rise - 1) * scene.focal / end) & (rows < scene.focal / end)
        scene.instance[:] = np.where(block, np.uint16(scene.new(BUILDING)), scene.instance)
        scene.depth[:] = np.where(block, f32(end), scene.depth)
    draw_objects(scene, rng, road, walk)
    return scene.instance, np.array(scene.classes), np.array(scene.materials), scene.depth


def render_scene(instance: np.ndarray, materials: np.ndarray, depth: np.ndarray, domain: str,
                 rng: np.random.Generator) -> Image.Image:
    """Colour a laid-out scene in one domain's appearance -> RGB image.

    game: flat colours. photo: muted colours with texture and sensor noise. fog: photo with
    depth fog. night: dark and blue, lit lamps and windows, more noise. rain: dull, wet and
    streaked. Colours are set per instance; texture, fog and light act on whole planes.
    """
    f32 = np.float32
    height, width = instance.shape
    palette, spread = (GAME_COLOURS, 1.0) if domain == "game" else (PHOTO_COLOURS, 0.6)
    jitter = rng.uniform(-spread, spread, (len(materials), 3)).astype(f32) * JITTER[materials, None]
    colours = np.clip(palette[materials] + jitter, 0, 255)  # (N, 3) one colour per instance
    if domain == "game":
        return Image.fromarray(np.take(colours.astype(np.uint8), instance, axis=0))
    lit = (materials == LAMP) | ((materials == WINDOW) & (rng.random(len(materials)) < 0.35))  # at night
    if domain == "night":
        colours = np.where(lit[:, None], colours * 1.1 + 40, colours * f32([0.75, 0.8, 1.1]))
    elif domain == "rain":
        colours = 0.75 * (0.6 * colours + 0.4 * colours.mean(axis=1, keepdims=True))
    # One lookup paints every per-instance value: colour, texture strength and being lit.
    table = np.concatenate([colours, TEXTURE[materials, None], lit[:, None]], axis=1)  # (N, 5)
    image, texture, glow = np.split(np.take(table.T, instance, axis=1), [3, 4])  # (3, H, W), (1, H, W), (1, H, W)
    # Grey texture: fine grain and coarse blotches scaled per material, plus sensor noise.
    fine = rng.integers(-128, 128, (height, width), dtype=np.int8) * f32(1.7 / 128)  # (H, W) unit-spread noise
    blotches = Image.fromarray(rng.standard_normal((height // 8 + 2, width // 8 + 2), dtype=f32))
    coarse = np.asarray(blotches.resize((width, height), Image.BILINEAR))
    offset = texture * (0.5 * fine + coarse) + {"photo": 3, "fog": 3, "night": 12, "rain": 6}[domain] * fine
    if domain == "fog":
        clear = np.exp(depth * f32(-1 / rng.uniform(12, 35)))  # the light that gets through
        image *= clear
        offset = offset * clear + f32(rng.uniform(170, 215)) * (1 - clear)
    elif domain == "night":
        light = np.where(glow > 0, f32(1), 0.06 + 0.6 * np.exp(depth * f32(-1 / rng.uniform(6, 14))))
        image *= light
        offset *= light
    elif domain == "rain":
        streaks = Image.fromarray((rng.random((height // 16 + 2, width)) < 0.03).astype(f32))
        offset = 0.75 * offset + 110 * np.asarray(streaks.resize((width, height), Image.BILINEAR))
    channels = np.clip(image + offset, 0, 255).astype(np.uint8)
    return Image.merge("RGB", [Image.fromarray(channel) for channel in channels])


class SyntheticDataset(SegmentationDataset):
    """Procedural street scenes in one appearance domain; nothing is read from disk.

    Sample `index` has the layout of (seed, split, index), the same in every domain, and
    the appearance of (seed, split, index, domain). image_size is (width, height).
    """

    def __init__(self, *, domain: str, split: str, length: int, image_size: tuple[int, int], seed: int,
                 train: bool, crop_size: int, pasta_args: tuple[float, float, float] | None = None) -> None:
        super().__init__(name=f"synthetic:{domain}", classes=CITYSCAPES_CLASSES, train=train,
                         crop_size=crop_size, test_size=None, pasta_args=pasta_args)
        self.domain, self.split, self.length, self.image_size, self.seed = domain, split, length, image_size, seed

    def __len__(self) -> int:
        return self.length

    def stem(self, index: int) -> str:
        return f"{self.domain}_{index:06d}"

    def _load(self, index: int) -> tuple[Image.Image, np.ndarray]:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.name} of length {self.length}")
        key = [self.seed, SPLITS["synthetic"].index(self.split), index]
        instance, classes, materials, depth = draw_scene(np.random.default_rng(key), *self.image_size)
        domain_rng = np.random.default_rng(key + [1 + SYNTHETIC_DOMAINS.index(self.domain)])
        image = render_scene(instance, materials, depth, self.domain, domain_rng)
        return image, np.take(classes.astype(np.uint8), instance)
