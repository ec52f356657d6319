"""Image sets without a metric on this machine yet (tfds images need FID): pictures only."""

from fgm_jax.evaluation import evaluators


class SamplesOnly(evaluators.Evaluator):
  has_metric = False
  missing_metric = ("needs FID with Inception-V3 weights, which is not implemented yet; use "
                    "--config.job=sample and an external FID tool on samples.npz for now.")

  def title(self):
    d = self.trainer.data_config
    return f"{d.name} ({d.tfds_name})"
