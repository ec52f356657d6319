"""tfds image sets (CIFAR-10): FID-N against reference statistics, features on all devices.

Needs config.eval.fid (configs/common.py ``fid()``): ``inception`` names the converted
Inception weights (``python -m fgm_jax.convert.inception``); ``reference`` an .npz of mu/sigma,
or unset to compute them once from the tfds split ``reference_split`` (cached beside the run).
Without Inception weights the sets are still drawn for pictures, and job=evaluate says what to
pass.
"""

import os

import numpy as np

from fgm_jax.evaluation import evaluators
from fgm_jax.evaluation import fid
from fgm_jax.evaluation import inception


def _images(x) -> np.ndarray:
  x = np.asarray(x)
  return np.repeat(x, 3, axis=-1) if x.shape[-1] == 1 else x


class FIDEvaluator(evaluators.Evaluator):

  @classmethod
  def metric_problem(cls, eval_config) -> str:
    """Why FID cannot be computed with this config ('' if it can); checks files, not images."""
    f = eval_config.fid
    if not f.inception:
      return ("needs Inception-V3 weights for FID: convert pytorch-fid's "
              "pt_inception-2015-12-05-6726825d.pth with `python -m fgm_jax.convert.inception "
              "<that file> fid_inception.safetensors` and pass "
              "--config.eval.fid.inception=fid_inception.safetensors.")
    if f.quantize not in fid.QUANTIZERS:
      return f"config.eval.fid.quantize={f.quantize!r}: expected one of {fid.QUANTIZERS}."
    if f.image_size < 75:
      return f"config.eval.fid.image_size={f.image_size}: Inception-V3 needs at least 75."
    return ""

  @classmethod
  def check_files(cls, eval_config) -> None:
    """Reads the Inception weights and reference statistics once, so a wrong file stops the
    job before anything is compiled or sampled."""
    f = eval_config.fid
    inception.check_params_file(f.inception)
    if f.reference:
      fid.load_reference(f.reference)

  def __init__(self, trainer, eval_config, workdir):
    super().__init__(trainer, eval_config, workdir)
    self.has_metric = not self.metric_problem(eval_config)
    self._extractor = None
    self._reference = None

  @property
  def fid_config(self):
    return self.eval_config.fid

  def extractor(self) -> fid.FeatureExtractor:
    if self._extractor is None:
      f = self.fid_config
      self._extractor = fid.FeatureExtractor(
          inception.load_params(f.inception), self.trainer.sharding, f.batch_size, f.image_size)
    return self._extractor

  def reference(self):
    if self._reference is None:
      f = self.fid_config
      if f.reference:
        self._reference = fid.load_reference(f.reference)
      else:
        self._reference = fid.reference_from_tfds(
            self.extractor(), self.trainer.data_config, f.reference_split,
            self.cache_dir("fid_reference"))
    return self._reference

  def metric(self, x, n):
    del n
    reference = self.reference()
    images = fid.quantize(_images(x), self.fid_config.quantize)
    return {"fid": fid.fid(self.extractor().stats(images), reference)}

  def note(self, n):
    f = self.fid_config
    source = f.reference or f"the {self.trainer.data_config.tfds_name} '{f.reference_split}' split"
    return (f"FID-{n} (lower is better): Inception-V3 pool features (pytorch-fid's FID network, "
            f"weights {os.path.basename(f.inception)}, images quantised to uint8 by "
            f"'{f.quantize}', resized to {f.image_size}) against the statistics of {source}. "
            "Published CIFAR-10 numbers: FGM one step 3.08; its 1-Rectified-Flow teacher 2.58 "
            "with an adaptive RK45 solver. Numbers from fewer than 50,000 samples, other "
            "Inception weights or another quantisation are not comparable with those.")

  def title(self):
    d = self.trainer.data_config
    return f"{d.name} ({d.tfds_name})"
