"""transformers' own common suites (ModelTesterMixin, BackboneTesterMixin, ConfigTester) on InternImage."""

import unittest

import torch
from conftest import import_common_tests
from transformers.models.auto import modeling_auto

from modeling_internimage import (
    InternImageBackbone,
    InternImageConfig,
    InternImageForImageClassification,
    InternImageModel,
)


modeling_common = import_common_tests("test_modeling_common")
backbone_common = import_common_tests("test_backbone_common")
configuration_common = import_common_tests("test_configuration_common")

# The mixins find task heads through transformers' static name tables, not through registered classes.
modeling_auto.MODEL_MAPPING_NAMES.setdefault("internimage", "InternImageModel")
modeling_auto.MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES.setdefault(
    "internimage", "InternImageForImageClassification"
)
modeling_auto.MODEL_FOR_BACKBONE_MAPPING_NAMES.setdefault("internimage", "InternImageBackbone")


class InternImageModelTester:
    def __init__(
        self,
        parent,
        batch_size=2,
        image_size=32,
        num_channels=3,
        channels=8,
        depths=(1, 1, 2, 1),
        groups=(1, 2, 4, 8),
        is_training=True,
        use_labels=True,
        num_labels=10,
        out_features=("stage2", "stage3", "stage4"),
        out_indices=(2, 3, 4),
    ):
        self.parent = parent
        self.batch_size = batch_size
        self.image_size = image_size
        self.num_channels = num_channels
        self.channels = channels
        self.depths = list(depths)
        self.groups = list(groups)
        self.num_stages = len(depths)
        self.hidden_sizes = [channels * 2**idx for idx in range(self.num_stages)]
        self.is_training = is_training
        self.use_labels = use_labels
        self.num_labels = num_labels
        self.out_features = list(out_features)
        self.out_indices = list(out_indices)

    def get_config(self):
        return InternImageConfig(
            num_channels=self.num_channels,
            channels=self.channels,
            depths=self.depths,
            groups=self.groups,
            layer_scale=1e-5,
            post_norm=True,
            num_labels=self.num_labels,
            out_features=self.out_features,
            out_indices=self.out_indices,
        )

    def prepare_config_and_inputs(self):
        pixel_values = modeling_common.floats_tensor(
            [self.batch_size, self.num_channels, self.image_size, self.image_size]
        )
        labels = modeling_common.ids_tensor([self.batch_size], self.num_labels) if self.use_labels else None
        return self.get_config(), pixel_values, labels

    def prepare_config_and_inputs_for_common(self):
        config, pixel_values, _ = self.prepare_config_and_inputs()
        return config, {"pixel_values": pixel_values}

    def create_and_check_model(self, config, pixel_values, labels):
        model = InternImageModel(config).eval()
        with torch.no_grad():
            result = model(pixel_values)
        final = self.image_size // 32
        self.parent.assertEqual(result.last_hidden_state.shape, (self.batch_size, self.hidden_sizes[-1], final, final))
        self.parent.assertEqual(result.pooler_output.shape, (self.batch_size, int(self.hidden_sizes[-1] * 1.5)))

    def create_and_check_for_image_classification(self, config, pixel_values, labels):
        model = InternImageForImageClassification(config).eval()
        with torch.no_grad():
            result = model(pixel_values, labels=labels)
        self.parent.assertEqual(result.logits.shape, (self.batch_size, self.num_labels))

    def create_and_check_backbone(self, config, pixel_values, labels):
        model = InternImageBackbone(config).eval()
        with torch.no_grad():
            result = model(pixel_values)
        self.parent.assertEqual(len(result.feature_maps), len(config.out_features))
        self.parent.assertEqual(model.channels, self.hidden_sizes[1:])
        for feature_map, stride, width in zip(result.feature_maps, (8, 16, 32), self.hidden_sizes[1:]):
            size = self.image_size // stride
            self.parent.assertEqual(feature_map.shape, (self.batch_size, width, size, size))


class InternImageModelTest(modeling_common.ModelTesterMixin, unittest.TestCase):
    all_model_classes = (InternImageModel, InternImageForImageClassification, InternImageBackbone)
    has_attentions = False
    test_resize_embeddings = False
    test_torch_exportable = True
    test_can_init_all_missing_weights_before_2023 = True

    def setUp(self):
        self.model_tester = InternImageModelTester(self)
        self.config_tester = configuration_common.ConfigTester(
            self,
            config_class=InternImageConfig,
            has_text_modality=False,
            common_properties=["channels", "depths", "groups", "num_channels", "hidden_sizes"],
            channels=8,
            depths=[1, 1, 1, 1],
        )

    def test_config(self):
        self.config_tester.run_common_tests()

    def test_model(self):
        self.model_tester.create_and_check_model(*self.model_tester.prepare_config_and_inputs())

    def test_for_image_classification(self):
        self.model_tester.create_and_check_for_image_classification(*self.model_tester.prepare_config_and_inputs())

    def test_backbone(self):
        self.model_tester.create_and_check_backbone(*self.model_tester.prepare_config_and_inputs())

    def test_hidden_states_output(self):
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        for model_class in self.all_model_classes:
            model = model_class(config).eval()
            with torch.no_grad():
                outputs = model(**inputs, output_hidden_states=True)
            hidden_states = outputs.hidden_states
            self.assertEqual(len(hidden_states), self.model_tester.num_stages + 1)
            for idx, hidden_state in enumerate(hidden_states):
                size = self.model_tester.image_size // (4 * 2 ** max(idx - 1, 0))
                width = [self.model_tester.channels, *self.model_tester.hidden_sizes][idx]
                self.assertEqual(hidden_state.shape, (self.model_tester.batch_size, width, size, size))

    @unittest.skip(reason="InternImage takes pixel_values, it has no input embeddings")
    def test_inputs_embeds(self):
        pass

    @unittest.skip(reason="InternImage takes pixel_values, it has no input embeddings")
    def test_model_get_set_embeddings(self):
        pass

    @unittest.skip(reason="InternImage has no feed-forward chunking (a CNN: no sequence dimension to chunk)")
    def test_feed_forward_chunking(self):
        pass


class InternImageBackboneTest(unittest.TestCase, backbone_common.BackboneTesterMixin):
    all_model_classes = (InternImageBackbone,)
    config_class = InternImageConfig
    has_attentions = False

    def setUp(self):
        self.model_tester = InternImageModelTester(self)
