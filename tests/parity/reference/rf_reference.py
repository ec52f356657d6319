"""An independent PyTorch NCSN++ in the RectifiedFlow CIFAR-10 settings, and its checkpoint files.

RectifiedFlow (gnobitab/RectifiedFlow, ``ImageGeneration/``) trains score_sde's ``ncsnpp``
network with resblock_type='biggan', progressive='none', progressive_input='none',
embedding_type='positional', conditional=True, skip_rescale=True, fir=False, centered data.
Their code is not installable and may not be copied, so this module re-states that network
from its description (their README, configs and the checkpoint layout of their source, read
only): one flat ``all_modules`` ModuleList whose state-dict keys are theirs
(``all_modules.7.Conv_2.weight``, ``all_modules.9.NIN_0.W``, the float64 ``sigmas`` buffer),
run in their order. Attribute names and registration order are the checkpoint format; the
computations are written here from the layer descriptions, not from their code.

Why not diffusers' ``UNet2DModel``: it expresses neither the BigGAN resampling blocks nor the
decoder attention of this layout (see tests/parity/test_rectified_flow_import.py's module docstring).

    model = NCSNpp(**NARROW)                       # two levels, attention at 16x16
    randomize_(model, seed=0)                      # every tensor, the zero-initialised ones too
    v = velocity(model, x_nhwc, t)                 # our convention: -u(x, 999 (1 - t))
    ckpt = write_random_checkpoint(path, **RUNLOCAL)  # their file format, random weights,
                                                   # the ':rf_teacher,runlocal' network

Architecture keywords (score_sde names): nf, ch_mult, num_res_blocks, attn_resolutions,
image_size, channels, dropout. The published CIFAR-10 teacher is ``PUBLISHED``.
"""

import dataclasses
import math
from typing import Dict, List, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# The published 1-Rectified-Flow CIFAR-10 network (their configs/rectified_flow/
# cifar10_rf_gaussian_ddpmpp.py).
PUBLISHED = dict(nf=128, ch_mult=(1, 2, 2, 2), num_res_blocks=4, attn_resolutions=(16,))
# The narrow network of the numerics test: two levels (so down / up blocks), attention at
# 16x16, one block per level, 16 base channels (GroupNorm then has 4 and 8 groups).
NARROW = dict(nf=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(16,))
# The network of the ':rf_teacher,runlocal' configs (configs/cifar10_teacher.rf_narrow_model):
# one level, attention only in the middle block; distilling it compiles fast on a CPU.
RUNLOCAL = dict(nf=16, ch_mult=(1,), num_res_blocks=1, attn_resolutions=())

EMA_DECAY = 0.999999  # the RectifiedFlow CIFAR-10 config's model.ema_rate


def _group_norm(channels: int) -> nn.GroupNorm:
  # score_sde: up to 32 groups of at least 4 channels, eps 1e-6.
  return nn.GroupNorm(min(channels // 4, 32), channels, eps=1e-6)


class PixelLinear(nn.Module):
  """score_sde's NIN: a per-pixel linear map whose weight is stored (in, out), then bias."""

  def __init__(self, cin: int, cout: int):
    super().__init__()
    self.W = nn.Parameter(torch.zeros(cin, cout))
    self.b = nn.Parameter(torch.zeros(cout))

  def forward(self, x):
    return torch.einsum("nihw,io->nohw", x, self.W) + self.b.view(1, -1, 1, 1)


class BigGANResBlock(nn.Module):
  """GN-SiLU-(resample)-conv, + temb bias, GN-SiLU-dropout-conv; 1x1 shortcut; sum / sqrt 2."""

  def __init__(self, cin: int, cout: int, temb_dim: int, up=False, down=False, dropout=0.0):
    super().__init__()
    self.up, self.down = up, down
    # Registration order = state-dict order: GroupNorm_0, Conv_0, Dense_0, GroupNorm_1, Conv_1,
    # Conv_2.
    self.GroupNorm_0 = _group_norm(cin)
    self.Conv_0 = nn.Conv2d(cin, cout, 3, padding=1)
    self.Dense_0 = nn.Linear(temb_dim, cout)
    self.GroupNorm_1 = _group_norm(cout)
    self.Dropout_0 = nn.Dropout(dropout)
    self.Conv_1 = nn.Conv2d(cout, cout, 3, padding=1)
    self.has_shortcut = cin != cout or up or down
    if self.has_shortcut:
      self.Conv_2 = nn.Conv2d(cin, cout, 1)

  def _resample(self, x):
    if self.up:  # nearest neighbour: every pixel becomes a 2x2 patch
      return x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    if self.down:  # mean of each 2x2 patch
      return F.avg_pool2d(x, 2)
    return x

  def forward(self, x, temb):
    h = self._resample(F.silu(self.GroupNorm_0(x)))
    x = self._resample(x)
    h = self.Conv_0(h) + self.Dense_0(F.silu(temb)).view(h.shape[0], -1, 1, 1)
    h = self.Conv_1(self.Dropout_0(F.silu(self.GroupNorm_1(h))))
    if self.has_shortcut:
      x = self.Conv_2(x)
    return (x + h) / math.sqrt(2.0)


class PixelAttention(nn.Module):
  """Single-head self-attention over all pixels; q, k, v, out are PixelLinear maps."""

  def __init__(self, channels: int):
    super().__init__()
    self.GroupNorm_0 = _group_norm(channels)
    self.NIN_0 = PixelLinear(channels, channels)  # query
    self.NIN_1 = PixelLinear(channels, channels)  # key
    self.NIN_2 = PixelLinear(channels, channels)  # value
    self.NIN_3 = PixelLinear(channels, channels)  # output

  def forward(self, x):
    n, c, hh, ww = x.shape
    h = self.GroupNorm_0(x)
    q, k, v = (m(h).reshape(n, c, hh * ww) for m in (self.NIN_0, self.NIN_1, self.NIN_2))
    weights = torch.softmax(torch.einsum("ncp,ncs->nps", q, k) / math.sqrt(c), dim=-1)
    out = torch.einsum("nps,ncs->ncp", weights, v).reshape(n, c, hh, ww)
    return (x + self.NIN_3(out)) / math.sqrt(2.0)


def timestep_features(labels, dim: int):
  """DDPM's sinusoidal features of the float label: [sin(l f_k), cos(l f_k)],
  f_k = 10000^(-k / (dim/2 - 1))."""
  half = dim // 2
  freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / (half - 1))
  args = labels.float()[:, None] * freqs[None, :]
  return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


def _sigmas(num_scales=1000, sigma_min=0.01, sigma_max=50.0):
  # The unused float64 buffer score_sde keeps (default_cifar10_configs' VE noise levels).
  return torch.tensor(np.exp(np.linspace(np.log(sigma_max), np.log(sigma_min), num_scales)))


class NCSNpp(nn.Module):
  """score_sde's NCSN++ with the DDPM++ BigGAN options above; ``forward(x_nchw, labels)``
  returns u, RectifiedFlow's prediction of data - noise at label = 999 s."""

  def __init__(self, nf=128, ch_mult=(1, 2, 2, 2), num_res_blocks=4, attn_resolutions=(16,),
               image_size=32, channels=3, dropout=0.0):
    super().__init__()
    self.register_buffer("sigmas", _sigmas())
    self.nf, self.ch_mult, self.nrb = nf, tuple(ch_mult), num_res_blocks
    self.attn_resolutions = tuple(attn_resolutions)
    self.image_size = image_size
    temb = 4 * nf
    block = lambda cin, cout, **kw: BigGANResBlock(cin, cout, temb, dropout=dropout, **kw)
    mods: List[nn.Module] = [nn.Linear(nf, temb), nn.Linear(temb, temb),
                             nn.Conv2d(channels, nf, 3, padding=1)]
    skips, ch = [nf], nf
    levels = len(self.ch_mult)
    for level, mult in enumerate(self.ch_mult):
      for _ in range(num_res_blocks):
        mods.append(block(ch, nf * mult))
        ch = nf * mult
        if self._attends(level):
          mods.append(PixelAttention(ch))
        skips.append(ch)
      if level < levels - 1:
        mods.append(block(ch, ch, down=True))
        skips.append(ch)
    mods += [block(ch, ch), PixelAttention(ch), block(ch, ch)]
    for level in reversed(range(levels)):
      for _ in range(num_res_blocks + 1):
        mods.append(block(ch + skips.pop(), nf * self.ch_mult[level]))
        ch = nf * self.ch_mult[level]
      if self._attends(level):
        mods.append(PixelAttention(ch))
      if level > 0:
        mods.append(block(ch, ch, up=True))
    assert not skips
    mods += [_group_norm(ch), nn.Conv2d(ch, channels, 3, padding=1)]
    self.all_modules = nn.ModuleList(mods)

  def _attends(self, level):
    return (self.image_size >> level) in self.attn_resolutions

  def forward(self, x, labels):
    mods = iter(self.all_modules)
    temb = timestep_features(labels, self.nf)
    temb = next(mods)(temb)
    temb = next(mods)(F.silu(temb))
    h = next(mods)(x)
    skips = [h]
    levels = len(self.ch_mult)
    for level in range(levels):
      for _ in range(self.nrb):
        h = next(mods)(h, temb)
        if self._attends(level):
          h = next(mods)(h)
        skips.append(h)
      if level < levels - 1:
        h = next(mods)(h, temb)
        skips.append(h)
    h = next(mods)(h, temb)
    h = next(mods)(h)
    h = next(mods)(h, temb)
    for level in reversed(range(levels)):
      for _ in range(self.nrb + 1):
        h = next(mods)(torch.cat([h, skips.pop()], dim=1), temb)
      if self._attends(level):
        h = next(mods)(h)
      if level > 0:
        h = next(mods)(h, temb)
    h = next(mods)(h)
    out = next(mods)(F.silu(h))
    assert next(mods, None) is None and not skips
    return out


def build(**arch) -> NCSNpp:
  return NCSNpp(**arch).eval()


def velocity(model: NCSNpp, x_nhwc: np.ndarray, t: np.ndarray) -> np.ndarray:
  """Our convention from theirs: v(x, t) = -u(x, 999 (1 - t)), NHWC in and out (float32)."""
  with torch.no_grad():
    x = torch.from_numpy(np.asarray(x_nhwc, np.float32)).permute(0, 3, 1, 2)
    labels = 999.0 * (1.0 - torch.from_numpy(np.asarray(t, np.float32)))
    u = model(x, labels)
  return (-u).permute(0, 2, 3, 1).numpy()


def randomize_(model: nn.Module, seed: int) -> nn.Module:
  """Overwrites every parameter with random values of a healthy scale, including the ones
  score_sde initialises to (almost) zero, so that every path of the network matters."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      if "GroupNorm" in name or name.startswith(f"all_modules.{len(model.all_modules) - 2}."):
        p.copy_(1.0 + 0.2 * noise if name.endswith("weight") else 0.2 * noise)
      elif p.ndim == 1:  # biases
        p.copy_(0.2 * noise)
      elif name.endswith(".W"):  # NIN, stored (in, out)
        p.copy_(noise / math.sqrt(p.shape[0]))
      else:  # conv / linear, stored (out, in, ...)
        p.copy_(noise / math.sqrt(p[0].numel()))
  return model


def state_arrays(model: nn.Module) -> Dict[str, np.ndarray]:
  """{state-dict key: float32 numpy array} of the parameters (the sigmas buffer left out)."""
  return {k: v.detach().numpy().copy() for k, v in model.named_parameters()}


@dataclasses.dataclass
class RandomCheckpoint:
  path: str
  step: int
  model: NCSNpp  # the reference net holding the raw ('model') weights
  ema_model: NCSNpp  # ... and the one holding the EMA shadow weights


def write_random_checkpoint(path, *, seed: int = 0, step: int = 800_000,
                            with_optimizer: bool = True, **arch) -> RandomCheckpoint:
  """Writes a RectifiedFlow training checkpoint of random weights, in their exact format.

  {'optimizer': Adam state_dict, 'model': DataParallel state_dict ('module.' keys, the float64
  'module.sigmas' buffer first), 'ema': {'decay', 'num_updates', 'shadow_params': [tensors in
  model.parameters() order]}, 'step': int}, saved with torch.save. The raw and the EMA
  weights are independent random draws, so a converter that picks the wrong ones fails.
  ``arch``: NCSNpp keywords (default the published network, ~1 GB with the optimizer; tests
  pass ``**RUNLOCAL`` for the ':rf_teacher,runlocal' configs or ``**NARROW``).
  """
  model = randomize_(build(**arch), seed)
  ema_model = randomize_(build(**arch), seed + 1)
  wrapped = nn.DataParallel(model)  # on CPU only a wrapper; it adds the 'module.' prefix
  optimizer = torch.optim.Adam(wrapped.parameters(), lr=2e-4, betas=(0.9, 0.999), eps=1e-8)
  if with_optimizer:  # one step, so that the optimizer state holds Adam moments as theirs does
    size = model.image_size
    x = torch.zeros(1, model.all_modules[2].in_channels, size, size)
    wrapped(x, torch.tensor([500.0])).square().mean().backward()
    optimizer.step()
    optimizer.zero_grad()
    randomize_(model, seed)  # the step moved the weights; restore the seeded draw
  shadow = [p.detach().clone() for p in ema_model.parameters()]
  torch.save({"optimizer": optimizer.state_dict(), "model": wrapped.state_dict(),
              "ema": {"decay": EMA_DECAY, "num_updates": step, "shadow_params": shadow},
              "step": step}, path)
  return RandomCheckpoint(str(path), step, model.eval(), ema_model.eval())


def param_count(model: nn.Module) -> int:
  return sum(p.numel() for p in model.parameters())


def key_shapes(model: nn.Module) -> Dict[str, Sequence[int]]:
  """{key: shape} of the whole state dict (buffers included), in state-dict order."""
  return {k: tuple(v.shape) for k, v in model.state_dict().items()}
