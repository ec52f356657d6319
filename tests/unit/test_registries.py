"""The registries agree with each other and with what each model / dataset module provides."""

import pytest
from ml_collections import ConfigDict

from configs import common
from fgm_jax import data
from fgm_jax import models
from fgm_jax.evaluation import evaluators
from fgm_jax.models import mmdit


def test_every_dataset_has_an_evaluator():
  for name in data.names():
    cls = evaluators.evaluator_class(ConfigDict(dict(name=name)))
    assert issubclass(cls, evaluators.Evaluator)
    assert cls.picture in ("scatter", "grid")
    assert cls.has_metric or cls.missing_metric  # no metric: say why, for job=evaluate


def test_model_rules_default_to_the_models_own():
  mlp = ConfigDict(dict(name="mlp"))
  assert models.logical_rules(mlp) == ()  # shape-rule FSDP
  assert models.example_cond(mlp, 4) is None
  mm = ConfigDict(common.mmdit(num_layers=1, attention_head_dim=8, num_attention_heads=2,
                               joint_attention_dim=12, caption_projection_dim=16,
                               pooled_projection_dim=8, in_channels=4, out_channels=4,
                               sample_size=8, pos_embed_max_size=8))
  assert models.logical_rules(mm) == mmdit.LOGICAL_RULES
  assert models.logical_rules(mm, tensor_parallel=True) == mmdit.TENSOR_LOGICAL_RULES
  cond = models.example_cond(mm, 4)
  assert cond["context"].shape[::2] == (4, 12) and cond["pooled"].shape == (4, 8)


def test_example_shapes_come_from_the_data_modules():
  assert data.example_shape(ConfigDict(dict(name="toy2d", distribution="moons"))) == (2,)
  assert data.example_shape(ConfigDict(dict(name="digits", shape=(8, 8, 1)))) == (8, 8, 1)
  problem = data.config_problem(ConfigDict(dict(name="toy2d", distribution="spiral")))
  assert "data.distribution='spiral'" in problem and "checkerboard" in problem
  with pytest.raises(ValueError, match="config.data.name='nope'"):
    data.example_shape(ConfigDict(dict(name="nope")))
