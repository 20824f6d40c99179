"""Embedded default datasets, built deterministically and offline from scikit-learn's handwritten digits (1,797
8x8 images of 0-9 that ship inside scikit-learn).

- `digits_classification()`: the digits as RGB images with a `label` ClassLabel, split train/validation.
- `digits_scenes()`: the digits pasted onto larger canvases, several per image, with their boxes (COCO xywh) and a
  per-pixel class mask (0 = background, 1 + digit), for detection and semantic segmentation.
"""

import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, Sequence, Value
from PIL import Image as PILImage
from sklearn.datasets import load_digits


DIGIT_NAMES = [str(digit) for digit in range(10)]


def _digit_images(upscale: int) -> tuple[list[np.ndarray], np.ndarray]:
    digits = load_digits()
    images = []
    for pixels in digits.images:  # 8x8, values 0..16
        gray = (pixels * (255.0 / 16.0)).astype(np.uint8)
        images.append(np.kron(gray, np.ones((upscale, upscale), dtype=np.uint8)))
    return images, digits.target


def _split(records: dict, validation_fraction: float, features: Features, seed: int) -> DatasetDict:
    order = np.random.default_rng(seed).permutation(len(next(iter(records.values()))))
    cut = int(len(order) * (1 - validation_fraction))
    pick = lambda idx: {key: [values[i] for i in idx] for key, values in records.items()}  # noqa: E731
    return DatasetDict(
        train=Dataset.from_dict(pick(order[:cut]), features=features),
        validation=Dataset.from_dict(pick(order[cut:]), features=features),
    )


def digits_classification(validation_fraction: float = 0.2, seed: int = 0) -> DatasetDict:
    """The 1,797 digits as 32x32 RGB images (label 0-9), 80/20 split."""
    images, targets = _digit_images(upscale=4)
    records = {
        "image": [PILImage.fromarray(image).convert("RGB") for image in images],
        "label": [int(target) for target in targets],
    }
    features = Features({"image": Image(), "label": ClassLabel(names=DIGIT_NAMES)})
    return _split(records, validation_fraction, features, seed)


def digits_scenes(
    num_images: int = 240,
    canvas: int = 96,
    digits_per_image: tuple[int, int] = (1, 3),
    seed: int = 0,
    validation_fraction: float = 0.2,
    digit_scale: int = 3,
) -> DatasetDict:
    """Canvases of `canvas` x `canvas` pixels holding 1-3 non-overlapping digits (8 * `digit_scale` pixels square)
    on a noisy background. Columns: `image`, `image_id`, `objects` {`bbox` (x, y, w, h), `category` (0-9), `area`,
    `id`}, and `mask` (0 background, 1 + digit)."""
    rng = np.random.default_rng(seed)
    images, targets = _digit_images(upscale=digit_scale)
    side = 8 * digit_scale
    records = {"image": [], "image_id": [], "objects": [], "mask": []}
    for image_id in range(num_images):
        canvas_pixels = rng.integers(0, 40, size=(canvas, canvas), dtype=np.uint8)
        mask = np.zeros((canvas, canvas), dtype=np.uint8)
        objects = {"bbox": [], "category": [], "area": [], "id": []}
        for _ in range(rng.integers(digits_per_image[0], digits_per_image[1] + 1)):
            for _attempt in range(20):
                y, x = rng.integers(0, canvas - side, size=2)
                if not mask[y : y + side, x : x + side].any():
                    break
            else:
                continue
            index = int(rng.integers(len(images)))
            digit, target = images[index], int(targets[index])
            ink = digit > 60
            canvas_pixels[y : y + side, x : x + side] = np.maximum(canvas_pixels[y : y + side, x : x + side], digit)
            mask[y : y + side, x : x + side][ink] = target + 1
            rows, cols = np.nonzero(ink)
            box = [
                float(x + cols.min()),
                float(y + rows.min()),
                float(cols.max() - cols.min() + 1),
                float(rows.max() - rows.min() + 1),
            ]
            objects["bbox"].append(box)
            objects["category"].append(target)
            objects["area"].append(box[2] * box[3])
            objects["id"].append(len(objects["id"]))
        records["image"].append(PILImage.fromarray(canvas_pixels).convert("RGB"))
        records["image_id"].append(image_id)
        records["objects"].append(objects)
        records["mask"].append(PILImage.fromarray(mask))
    features = Features(
        {
            "image": Image(),
            "image_id": Value("int64"),
            "objects": {
                "bbox": Sequence(Sequence(Value("float32"), length=4)),
                "category": Sequence(ClassLabel(names=DIGIT_NAMES)),
                "area": Sequence(Value("float32")),
                "id": Sequence(Value("int64")),
            },
            "mask": Image(),
        }
    )
    return _split(records, validation_fraction, features, seed)
