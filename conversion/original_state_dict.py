"""Strict accounting of an original state dict against the model it converts into, in the original's key names and
before any weight is allocated (the model may live on the meta device)."""

from collections.abc import Callable, Mapping

import torch


def _first(items: list[str], separator: str, limit: int = 20) -> str:
    """The first `limit` items joined, and how many more there are."""
    more = f"{separator}... and {len(items) - limit} more" if len(items) > limit else ""
    return separator.join(items[:limit]) + more


def convert_original_state_dict(
    model: torch.nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    name_of: Callable[[str], str] | None = None,
) -> dict[str, torch.Tensor]:
    """`state_dict` (the original implementation's names, or OpenGVLab's Hub layout) renamed to `model`'s names by
    `name_of` (default: the InternImage model's `name_of_original_key`).

    The account is strict: a source key that nothing uses, a weight left unfilled or a shape that differs is a
    ValueError listing the keys by their original names, which is also what a checkpoint of another variant gives.
    """
    expected = model.state_dict()
    name_of = name_of or model.name_of_original_key
    converted = {name_of(key): (key, tensor) for key, tensor in state_dict.items()}
    unused = sorted(key for name, (key, _) in converted.items() if name not in expected)
    missing = sorted(name for name in expected if name not in converted)
    mismatched = sorted(
        f"{key}: checkpoint {tuple(tensor.shape)} vs model {tuple(expected[name].shape)}"
        for name, (key, tensor) in converted.items()
        if name in expected and tensor.shape != expected[name].shape
    )
    problems = []
    if unused:
        problems.append(f"{len(unused)} checkpoint keys match no weight of the model: {_first(unused, ', ')}")
    if missing:
        problems.append(f"{len(missing)} model weights are not in the checkpoint: {_first(missing, ', ')}")
    if mismatched:
        problems.append(f"{len(mismatched)} shapes differ: {_first(mismatched, '; ')}")
    if problems:
        raise ValueError(
            f"The state dict does not fit this {type(model).__name__} (is it of another variant?). "
            + " | ".join(problems)
        )
    return {name: tensor for name, (_, tensor) in converted.items()}
