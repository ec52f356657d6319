"""The CIFAR-10 path end to end, as a user with the published files runs it, on CPU-sized parts:

RectifiedFlow checkpoint (their file format, random weights, the narrow ':rf_teacher,runlocal'
network) -> `python -m fgm_jax.convert.rectified_flow` -> FGM iterations with
configs/cifar10_fgm.py:rf_teacher,runlocal -> job=evaluate: FID of the teacher's Euler samples
and the one-step generator against reference statistics computed from (mock) CIFAR-10, with
random Inception weights written the way the Inception converter writes real ones.

Image size 75 instead of 299 keeps Inception's cost down; everything else is the real path.
"""

import json
import math
import os

import pytest

pytest.importorskip("torch")

from configs import cifar10_fgm  # noqa: E402
from configs import cifar10_teacher  # noqa: E402
from fgm_jax import main as main_lib  # noqa: E402
from fgm_jax.convert import inception as convert_inception  # noqa: E402
from fgm_jax.convert import rectified_flow  # noqa: E402
from fgm_jax.evaluation import inception  # noqa: E402
from tests.parity.reference import rf_reference  # noqa: E402

NUM_SAMPLES = 128


def test_rf_checkpoint_to_fid(tmp_path):
  import tensorflow_datasets as tfds
  ckpt = rf_reference.write_random_checkpoint(str(tmp_path / "checkpoint_8.pth"),
                                              with_optimizer=False, **rf_reference.RUNLOCAL)
  teacher_dir = str(tmp_path / "cifar10_rf_teacher")
  rectified_flow.convert(ckpt.path, teacher_dir,
                         cifar10_teacher.get_config("rf_teacher,runlocal"), log=lambda _: None)

  weights = str(tmp_path / "inception_random.safetensors")
  convert_inception.save_variables(inception.init_params(0), weights, {"official": "false"})
  config = cifar10_fgm.get_config("rf_teacher,runlocal")
  config.teacher.workdir = teacher_dir
  config.eval.fid.update(inception=weights, image_size=75, batch_size=128,
                         reference_split="train", every=3, every_num=NUM_SAMPLES)
  config.eval.classifier_dir = str(tmp_path / "cache")
  fgm_dir = str(tmp_path / "cifar10_rf_fgm")
  with tfds.testing.mock_data(num_examples=128):
    main_lib.run(config, fgm_dir)  # 3 FGM iterations, FID-128 of the generator at step 3
    config.job = "evaluate"
    config.eval.num_samples = NUM_SAMPLES
    config.eval.teacher_steps = (1, 4)
    results = main_lib.run(config, fgm_dir)

  assert results["step"] == 3 and results["num_samples"] == NUM_SAMPLES
  sets = ["teacher_euler_1step", "teacher_euler_4step", "fgm_1step"]
  assert set(results) == {"step", "num_samples", "weights", *sets}
  fids = {k: results[k]["fid"] for k in sets}
  assert all(math.isfinite(v) and v > 0 for v in fids.values()), fids
  assert len(set(fids.values())) == 3, fids  # three different sample sets
  with open(os.path.join(fgm_dir, "eval.json")) as f:
    assert json.load(f) == results
  assert os.path.isfile(os.path.join(tmp_path, "cache", "fid_stats_cifar10_train.npz"))
  scalars = _tensorboard_scalars(fgm_dir)
  # The training-time FID (same noise and sample count as the evaluation's FGM set) and the
  # evaluation's scalars.
  assert scalars[(3, f"fid{NUM_SAMPLES}/fgm_1step")] == pytest.approx(fids["fgm_1step"], 1e-6)
  for k in sets:
    assert scalars[(3, f"eval/{k}/fid")] == pytest.approx(fids[k], rel=1e-6)


def _tensorboard_scalars(workdir):
  import tensorflow as tf
  found = {}
  for name in os.listdir(workdir):
    if not name.startswith("events.out.tfevents"):
      continue
    for event in tf.compat.v1.train.summary_iterator(os.path.join(workdir, name)):
      for v in event.summary.value:
        found[(event.step, v.tag)] = float(tf.make_ndarray(v.tensor)) if v.HasField(
            "tensor") else v.simple_value
  return found
