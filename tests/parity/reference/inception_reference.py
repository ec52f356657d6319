"""pytorch-fid's FID InceptionV3 with random weights: the reference for the Flax port.

pytorch-fid's constructor downloads the FID weights (``fid_inception_v3`` calls
``load_state_dict_from_url`` then ``load_state_dict``). Here both are patched out for the
duration of the construction, the network keeps its constructor's weights, and then every
weight and BatchNorm statistic is drawn at random (He-scaled conv kernels so activations
stay O(1) through the ~50 ReLU layers; BN scales, shifts, running means and variances away
from their trivial 1/0/0/1, so a swapped or ignored statistic shows). Everything else, the
FID blocks, the block assembly, the resize and the input scaling, is pytorch-fid's own code.
"""

import contextlib

import numpy as np
import torch


@contextlib.contextmanager
def _no_weight_download(pfid, torchvision):
  saved = (pfid.load_state_dict_from_url, torchvision.models.inception.Inception3.load_state_dict)
  pfid.load_state_dict_from_url = lambda *a, **k: {}
  torchvision.models.inception.Inception3.load_state_dict = lambda self, *a, **k: None
  try:
    yield
  finally:
    pfid.load_state_dict_from_url = saved[0]
    torchvision.models.inception.Inception3.load_state_dict = saved[1]


@torch.no_grad()
def _randomize(module, seed):
  g = torch.Generator().manual_seed(seed)
  for name, p in module.named_parameters():
    if name.endswith("conv.weight"):
      fan_in = p[0].numel()
      p.copy_(torch.randn(p.shape, generator=g) * (2.0 / fan_in) ** 0.5)
    elif name.endswith("bn.weight"):
      p.copy_(0.5 + torch.rand(p.shape, generator=g))
    else:  # bn.bias, fc
      p.copy_(0.1 * torch.randn(p.shape, generator=g))
  for name, b in module.named_buffers():
    if name.endswith("running_mean"):
      b.copy_(0.1 * torch.randn(b.shape, generator=g))
    elif name.endswith("running_var"):
      b.copy_(0.5 + 1.5 * torch.rand(b.shape, generator=g))


def build(seed: int = 0):
  """(pytorch-fid InceptionV3 in eval mode, the state dict a weights file would hold).

  The state dict is that of ``fid_inception_v3()``'s torchvision Inception3, exactly what
  pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` holds.
  """
  import pytorch_fid.inception as pfid
  import torchvision

  with _no_weight_download(pfid, torchvision):
    inception3 = pfid.fid_inception_v3()
  _randomize(inception3, seed)
  saved = pfid.fid_inception_v3
  pfid.fid_inception_v3 = lambda: inception3  # InceptionV3 builds its blocks from ours
  try:
    model = pfid.InceptionV3([pfid.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
  finally:
    pfid.fid_inception_v3 = saved
  return model, inception3.state_dict()


@torch.no_grad()
def pool_features(model, images_uint8) -> np.ndarray:
  """pytorch-fid's features of uint8 NHWC images, through its own preprocessing: each image
  through torchvision's ToTensor (as pytorch-fid's ImagePathDataset), then the model."""
  from torchvision.transforms import functional as TF
  batch = torch.stack([TF.to_tensor(np.asarray(img)) for img in images_uint8])
  return model(batch)[0].squeeze(-1).squeeze(-1).numpy()


def resize(images01_nhwc: np.ndarray, size: int) -> np.ndarray:
  """torch's bilinear resize, as pytorch-fid calls it, on NHWC float images."""
  x = torch.from_numpy(np.ascontiguousarray(np.transpose(images01_nhwc, (0, 3, 1, 2))))
  y = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear",
                                      align_corners=False)
  return np.transpose(y.numpy(), (0, 2, 3, 1))
