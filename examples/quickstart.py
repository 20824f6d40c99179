"""Quick start, offline: build a small InternImage classifier, save it with its image processor, reload it through
the Auto classes and classify an image.

    .venv/bin/python examples/quickstart.py [--variant t] [--output-dir DIR] [--overwrite]

Without --output-dir the model goes to a temporary directory that is removed at the end.
"""

import argparse
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModel, AutoModelForImageClassification
from transformers.utils import logging

import modeling_internimage  # noqa: F401  (registers InternImage with the Auto classes)
from modeling_internimage import InternImageConfig, InternImageForImageClassification, build_image_processor


def demo_image(size: int = 256) -> Image.Image:
    """A deterministic picture: a bright disc on a gradient."""
    y, x = np.mgrid[0:size, 0:size]
    red = (255 * x / size).astype(np.uint8)
    green = (255 * ((x - size / 2) ** 2 + (y - size / 2) ** 2 < (size / 4) ** 2)).astype(np.uint8)
    blue = (255 * y / size).astype(np.uint8)
    return Image.fromarray(np.stack([red, green, blue], axis=-1))


def run(output_dir: Path, variant: str, overwrite: bool) -> None:
    logging.set_verbosity_error()  # the base model's load report lists the classifier weights it leaves out
    logging.disable_progress_bar()
    if output_dir.exists() and any(output_dir.iterdir()) and not overwrite:
        raise SystemExit(f"error: {output_dir} exists and is not empty; pass --overwrite to replace it.")
    torch.manual_seed(0)
    # The variant's block design at a reduced width and depth, so the demo runs in seconds on a CPU.
    config = InternImageConfig.from_variant(
        variant,
        channels=32,
        depths=[1, 1, 2, 1],
        groups=[2, 4, 8, 16],
        level2_post_norm_block_ids=[1],
        id2label={idx: f"class_{idx}" for idx in range(10)},
    )
    model = InternImageForImageClassification(config).eval()
    processor = build_image_processor(size=224)
    if output_dir.exists():
        shutil.rmtree(output_dir)
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    print(
        f"saved InternImage-{variant.upper()}-style model ({model.num_parameters() / 1e6:.2f} M parameters) "
        f"to {output_dir}: {', '.join(sorted(p.name for p in output_dir.iterdir()))}"
    )

    classifier = AutoModelForImageClassification.from_pretrained(output_dir).eval()
    base = AutoModel.from_pretrained(output_dir).eval()
    processor = AutoImageProcessor.from_pretrained(output_dir)
    inputs = processor(demo_image(), return_tensors="pt")
    with torch.no_grad():
        logits = classifier(**inputs).logits
        features = base(**inputs, output_hidden_states=True)
        difference = (logits - model(**inputs).logits).abs().max().item()
    # Loaded weights may sit at other memory alignments, which can change float summation order in the last bit.
    if difference > 1e-5:
        raise SystemExit(f"error: the reloaded model's logits differ from the saved model's by {difference:.2e}")
    print(f"reloaded through AutoModelForImageClassification: logits agree (max difference {difference:.1e})")
    print("hidden states:", ", ".join(str(tuple(h.shape)) for h in features.hidden_states))
    probabilities = logits.softmax(-1)[0]
    top = probabilities.topk(5)
    print("top-5 (untrained weights, so the scores are near uniform):")
    for score, idx in zip(top.values.tolist(), top.indices.tolist()):
        print(f"  {classifier.config.id2label[idx]:<10} {score:.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="t", help="t, s, b, l, xl, h or g (block design to use)")
    parser.add_argument("--output-dir", type=Path, help="where to save the model (default: a temporary directory)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --output-dir")
    args = parser.parse_args()
    if args.output_dir is not None:
        run(args.output_dir, args.variant, args.overwrite)
        return
    with tempfile.TemporaryDirectory() as tmp:
        run(Path(tmp) / "internimage-demo", args.variant, overwrite=False)


if __name__ == "__main__":
    main()
