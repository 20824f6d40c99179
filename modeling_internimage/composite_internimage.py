# Copyright 2026 The InternImage-HF authors. All rights reserved.
#
# Licensed under the MIT License.
"""Remote code for transformers models that hold an InternImage backbone (UperNet, RT-DETR, Mask2Former, ...).

transformers resolves a composite config's `backbone_config` through its config registry, where `internimage` is
found only once this package registered it. A model passed to `share_as_remote_code` saves this file and the
package's model files beside its weights, and its config.json names this module's subclass of the composite's
config class in `auto_map["AutoConfig"]`. Loading the directory with `trust_remote_code=True` then imports this
module, which registers InternImage; the composite model itself is transformers' own class.

The subclass has a model type of its own (`upernet_internimage` for UperNet, ...). With transformers' own type
(`upernet`) in config.json, transformers would use its own config class whenever `trust_remote_code` is not given,
and fail on the unknown backbone with a bare `KeyError: 'internimage'`; with a type it does not know, it asks for
`trust_remote_code=True` instead. Where this package is imported the type is registered, so the directory loads
without remote code too.
"""

import transformers
from transformers import AutoBackbone, AutoConfig
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping

from .configuration_internimage import InternImageConfig
from .modeling_internimage import InternImageBackbone


AutoConfig.register(InternImageConfig.model_type, InternImageConfig, exist_ok=True)
AutoBackbone.register(InternImageConfig, InternImageBackbone, exist_ok=True)


COMPOSITE_MODEL_TYPE_SUFFIX = "_internimage"


def shareable_config_class(base: type) -> type:
    """A subclass of the composite config class `base` with its name and the model type `<base type>_internimage`,
    defined in this module and registered with AutoConfig: saving an instance writes this module and `auto_map`,
    and transformers' own class is left as it is."""
    shareable = globals().get(base.__name__)
    if shareable is None:
        model_type = base.model_type + COMPOSITE_MODEL_TYPE_SUFFIX
        attributes = {"__module__": __name__, "__doc__": base.__doc__, "model_type": model_type}
        shareable = type(base.__name__, (base,), attributes)
        globals()[base.__name__] = shareable
        AutoConfig.register(model_type, shareable, exist_ok=True)
        # Weights are written and read in the base's checkpoint layout (RT-DETR renames some on load and save).
        conversions = get_checkpoint_conversion_mapping(base.model_type)
        if conversions:
            register_checkpoint_conversion_mapping(model_type, conversions, overwrite=True)
    return shareable


def __getattr__(name: str) -> type:
    """The class an `auto_map` names (e.g. `UperNetConfig`), made on first use."""
    base = getattr(transformers, name, None)
    if not (isinstance(base, type) and issubclass(base, transformers.PreTrainedConfig)):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return shareable_config_class(base)


def share_as_remote_code(model: transformers.PreTrainedModel) -> transformers.PreTrainedModel:
    """Make `model` (any transformers model whose `config.backbone_config` is an `InternImageConfig`) save as a
    directory that loads with `trust_remote_code=True` where this package is not installed: `save_pretrained` and
    `push_to_hub` then write the code files and `auto_map` too. Returns the model."""
    config = model.config
    if not isinstance(getattr(config, "backbone_config", None), InternImageConfig):
        raise ValueError(
            f"{type(model).__name__} has no InternImage backbone_config; share_as_remote_code is for composite models "
            "(UperNet, RT-DETR, ...) built on InternImageBackbone. An InternImage model saves its code by itself."
        )
    base = next(cls for cls in type(config).__mro__ if cls.__module__.startswith("transformers."))
    config.__class__ = shareable_config_class(base)
    config.__class__.register_for_auto_class("AutoConfig")
    return model


__all__ = ["share_as_remote_code"]
