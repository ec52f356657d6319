"""The FGM initialisation switches (config.fgm.init_generator / init_online): both nets start
as the teacher by default (DESIGN.md) and from the model's own random init when asked, with
different draws for the two."""

import jax
import numpy as np
import pytest

from fgm_jax import config_checks
from fgm_jax import fgm
from fgm_jax import sharding as sharding_lib
from fgm_jax.train import trainers
from tests import helpers


def _start(gen, online):
  c = helpers.tiny_fgm_config("unused")
  c.fgm.init_generator, c.fgm.init_online = gen, online
  mesh = sharding_lib.mesh_from_config(c.mesh)
  teacher = trainers.TeacherTrainer(trainers._teacher_run_config(c), mesh)
  teacher_params = jax.device_get(teacher.init_state().params)
  state = trainers.FGMTrainer(c, mesh, teacher_params=teacher_params).init_state()
  leaves = lambda tree: [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]
  return leaves(teacher_params), leaves(state.gen_params), leaves(state.online_params), \
      leaves(state.gen_ema_params)


def _same(a, b):
  return all(np.array_equal(x, y) for x, y in zip(a, b))


def test_default_starts_both_nets_at_the_teacher_and_random_starts_differ():
  teacher, gen, online, ema = _start("teacher", "teacher")
  assert _same(gen, teacher) and _same(online, teacher) and _same(ema, teacher)
  teacher, gen, online, ema = _start("random", "random")
  assert not _same(gen, teacher) and not _same(online, teacher) and not _same(gen, online)
  assert _same(ema, gen)  # the EMA starts where the generator starts
  teacher, gen, online, _ = _start("teacher", "random")
  assert _same(gen, teacher) and not _same(online, teacher)


def test_unknown_choice_is_refused():
  c = helpers.tiny_fgm_config("unused")
  c.fgm.init_online = "zeros"
  assert "config.fgm.init_online='zeros'" in fgm.check_config(c.fgm)
  with pytest.raises(config_checks.ConfigError, match="init_online='zeros'"):
    config_checks.validate(c)
