"""The image processor reproduces the original evaluation transform; the classification pipeline runs end to end."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, pipeline

from modeling_internimage import InternImageConfig, InternImageForImageClassification, build_image_processor


IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def original_eval_transform(image: Image.Image, size: int) -> np.ndarray:
    """The original `classification/dataset/build.py` eval path written with PIL and numpy: resize the shortest
    edge to `size` (bicubic, long side truncated), centre crop `size` (offsets rounded), scale to [0, 1],
    normalise with ImageNet mean/std; CHW float32."""
    width, height = image.size
    if width <= height:
        new_size = (size, int(size * height / width))
    else:
        new_size = (int(size * width / height), size)
    resized = image.resize(new_size, Image.BICUBIC)
    left = int(round((new_size[0] - size) / 2.0))
    top = int(round((new_size[1] - size) / 2.0))
    cropped = np.asarray(resized.crop((left, top, left + size, top + size)), dtype=np.float32) / 255.0
    return ((cropped - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1)


def random_image(width: int, height: int, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def crop_margin(width: int, height: int, size: int) -> int:
    """Pixels the long side exceeds the crop by after the shortest-edge resize."""
    return int(size * max(width, height) / min(width, height)) - size


def image_with_margin_parity(width: int, height: int, size: int, odd: bool, seed: int = 0) -> Image.Image:
    """A random image near `width` x `height` whose crop margin has the requested parity."""
    while crop_margin(width, height, size) % 2 != int(odd):
        if width > height:
            width += 1
        else:
            height += 1
    return random_image(width, height, seed)


@pytest.mark.parametrize("variant, size", [("t", 224), ("l", 384), ("g", 512), ("h", 640)])
def test_processor_matches_original_eval_transform(variant, size, tmp_path):
    processor = build_image_processor(variant)
    processor.save_pretrained(tmp_path)
    assert (tmp_path / "preprocessor_config.json").exists()
    reloaded = AutoImageProcessor.from_pretrained(tmp_path)
    landscape = image_with_margin_parity(size + 57, size + 20, size, odd=False)
    portrait = image_with_margin_parity(size - 31, size + 90, size, odd=False, seed=1)
    for image in (landscape, portrait, random_image(size, size, seed=2)):
        expected = original_eval_transform(image, size)
        actual = reloaded(image, return_tensors="pt")["pixel_values"][0].numpy()
        assert actual.shape == (3, size, size)
        # PIL resizes identically on both sides; float rounding of rescale/normalise differs in the last bits.
        np.testing.assert_allclose(actual, expected, atol=1e-5)


def test_odd_crop_margin_shifts_by_at_most_one_pixel():
    """With an odd margin, transformers' centre crop floors the offset while the original's torchvision crop
    rounds half to even, so the two crops can sit one pixel apart along the long side (see the README)."""
    size = 224
    image = image_with_margin_parity(size + 57, size + 20, size, odd=True)
    actual = build_image_processor(size=size)(image, return_tensors="pt")["pixel_values"][0].numpy()
    expected = original_eval_transform(image, size)
    differences = [
        np.abs(actual - expected).max(),
        np.abs(actual[:, :, 1:] - expected[:, :, :-1]).max(),
        np.abs(actual[:, :, :-1] - expected[:, :, 1:]).max(),
    ]
    assert min(differences) < 1e-5


def test_image_classification_pipeline_end_to_end(tmp_path):
    torch.manual_seed(0)
    config = InternImageConfig(
        channels=8, depths=[1, 1, 1, 1], groups=[1, 2, 4, 8], id2label={0: "cat", 1: "dog", 2: "bird"}
    )
    model = InternImageForImageClassification(config).eval()
    model.save_pretrained(tmp_path)
    build_image_processor(size=64).save_pretrained(tmp_path)

    classifier = pipeline("image-classification", model=str(tmp_path))
    image = random_image(90, 70)
    predictions = classifier(image, top_k=3)
    assert {p["label"] for p in predictions} == {"cat", "dog", "bird"}
    pixel_values = build_image_processor(size=64)(image, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        probabilities = model(pixel_values).logits.softmax(-1)[0]
    label_ids = {label: idx for idx, label in config.id2label.items()}
    for prediction in predictions:
        expected = probabilities[label_ids[prediction["label"]]].item()
        assert prediction["score"] == pytest.approx(expected, abs=1e-5)
