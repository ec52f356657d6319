"""Shape-only data config for data-free distillation in a latent space (SD3's VAE latents).

FGM never reads images: the generator's samples are its data. A latent-space teacher still
needs to say what one example looks like, so ``config.teacher.data`` is
``{'name': 'latents', 'shape': (height / 8, width / 8, channels)}`` (filled in from the SD3
folder by sd3/distill.py). Building it as a data source is a mistake in the config.
"""


def check_config(data_config):
  shape = tuple(data_config.shape)
  if len(shape) != 3 or min(shape) < 1:
    return (f"data.shape={shape}: latents need (height, width, channels), e.g. (64, 64, 16) "
            "for SD3 at 512 x 512.")
  return None


def from_config(data_config, seed):
  del seed
  raise ValueError(f"data.name='latents' (shape {tuple(data_config.shape)}) describes the "
                   "latent space of a data-free distillation; it has no examples to read.")
