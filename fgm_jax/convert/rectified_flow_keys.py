"""RectifiedFlow / score_sde NCSN++ state-dict keys -> our ``SongUNet`` parameters.

score_sde's ``NCSNpp`` (models/ncsnpp.py, which gnobitab/RectifiedFlow's ``ImageGeneration/``
trains) keeps every layer in one flat ``all_modules`` ModuleList, numbered in the order the
forward pass uses them. With RectifiedFlow's CIFAR-10 options (resblock_type='biggan',
progressive='none', progressive_input='none', embedding_type='positional', conditional=True)
the list is, for L levels of ``num_res_blocks`` = B blocks each:

    0, 1          Linear nf -> 4nf, 4nf -> 4nf      time embedding MLP (silu between)
    2             Conv2d 3x3 channels -> nf         input conv
    per level l   B x ResnetBlockBigGANpp (+ AttnBlockpp after each, at attention levels),
                  then (l < L-1) one ResnetBlockBigGANpp(down=True)
    middle        ResnetBlockBigGANpp, AttnBlockpp, ResnetBlockBigGANpp
    per level l   B+1 x ResnetBlockBigGANpp on cat([h, skip]) (levels L-1 ... 0),
    (reversed)    one AttnBlockpp after the last of them at attention levels,
                  then (l > 0) one ResnetBlockBigGANpp(up=True)
    last two      GroupNorm, Conv2d 3x3 -> channels (out = conv(silu(norm(h))))

Module -> our parameter path (``module_plan`` builds this for any such configuration; R is the
image size, r = R >> l the level's resolution):

    score_sde module                          ours
    0 / 1 Linear                              map_layer0 / map_layer1
    2 Conv2d                                  enc_RxR_conv
    encoder level l, block b (+ its Attn)     enc_rxr_block{b}
    down block closing level l                enc_{r/2}x{r/2}_down
    middle ResBlock + Attn / ResBlock         dec_{r}x{r}_in0 / dec_{r}x{r}_in1  (r = R >> L-1)
    decoder level l, block b                  dec_rxr_block{b}, b = 0 ... B
    decoder Attn of level l                   dec_rxr_block{B} (the attention of that block)
    up block closing level l                  dec_{2r}x{2r}_up
    GroupNorm / Conv2d at the end             dec_RxR_aux_norm / dec_RxR_aux_conv

For the published network (nf 128, ch_mult (1, 2, 2, 2), B = 4, attention at 16x16; 55
modules, 564 tensors, 61,804,419 parameters):

    0 map_layer0           17-20 enc_8x8_block0-3       34 dec_8x8_up
    1 map_layer1           21 enc_4x4_down              35-39 dec_8x8_block0-4
    2 enc_32x32_conv       22-25 enc_4x4_block0-3       40 dec_16x16_up
    3-6 enc_32x32_block0-3 26 + 27 dec_4x4_in0 (Attn)   41-45 dec_16x16_block0-4
    7 enc_16x16_down       28 dec_4x4_in1               46 dec_16x16_block4 (Attn)
    8/9, 10/11, 12/13,     29-33 dec_4x4_block0-4       47 dec_32x32_up
    14/15 enc_16x16_block0-3 (ResBlock/Attn)            48-52 dec_32x32_block0-4
    16 enc_8x8_down                                     53 dec_32x32_aux_norm
                                                        54 dec_32x32_aux_conv

Inside a block (torch key suffix -> ours; layouts: conv OIHW -> HWIO, Linear (out, in) ->
(in, out), GroupNorm weight -> scale):

    ResnetBlockBigGANpp  GroupNorm_0 -> norm0, Conv_0 -> conv0, Dense_0 -> affine,
                         GroupNorm_1 -> norm1, Conv_1 -> conv1,
                         Conv_2 (1x1; only on a channel change or up/down) -> skip
    AttnBlockpp          GroupNorm_0 -> norm2, NIN_3 -> proj (W is (in, out) already:
                         kernel = W[None, None]), NIN_0/1/2 (q, k, v) -> qkv interleaved:
                         qkv kernel[0, 0, i, 3 c + j] = NIN_j.W[i, c], bias[3 c + j] = NIN_j.b[c]

The float64 buffer ``sigmas`` (score_sde's VE noise levels, unused with scale_by_sigma=False)
is not a weight and is dropped by the caller. DataParallel's ``module.`` prefix is stripped
by the caller too; keys here have none.
"""

import dataclasses
from typing import Callable, Dict, List, Mapping, Optional, Tuple

import numpy as np

from fgm_jax.convert import common

Shape = Tuple[int, ...]

# What our SongUNet config must say for score_sde's DDPM++ BigGAN layout to map onto it.
_REQUIRED = dict(embedding_type="positional", channel_mult_noise=1, channel_mult_emb=4,
                 encoder_type="standard", decoder_type="standard", resample_filter=(1, 1),
                 num_heads=1, label_dim=0, augment_dim=0)


@dataclasses.dataclass(frozen=True)
class Module:
  """One entry of score_sde's ``all_modules`` and where it goes in our tree."""
  index: int
  kind: str  # 'linear', 'conv', 'norm', 'resblock' or 'attention'
  ours: str  # our top-level module name, e.g. 'enc_16x16_block0'
  cin: int
  cout: int
  resample: bool = False  # a BigGAN block with up=True or down=True
  temb: int = 0  # resblocks: width of the time embedding

  @property
  def shortcut(self) -> bool:
    return self.cin != self.cout or self.resample


def check_model_config(model_config) -> None:
  """ValueError unless ``model_config`` is a SongUNet in score_sde's DDPM++ BigGAN layout."""
  for field, want in _REQUIRED.items():
    got = model_config[field]
    if (tuple(got) if isinstance(got, (list, tuple)) else got) != want:
      raise ValueError(f"config.model.{field}={got!r}: RectifiedFlow checkpoints (score_sde "
                       f"DDPM++, BigGAN blocks) need {want!r}; start from "
                       "unet.rectified_flow_cifar10().")


def module_plan(model_config, image_size: int, channels: int) -> List[Module]:
  """score_sde's ``all_modules`` for this architecture, in order, mapped to our names."""
  check_model_config(model_config)
  nf = model_config.model_channels
  mults = tuple(model_config.channel_mult)
  blocks = model_config.num_blocks
  attn = tuple(model_config.attn_resolutions)
  temb = nf * model_config.channel_mult_emb
  plan: List[Module] = []

  def add(kind, ours, cin, cout, resample=False):
    plan.append(Module(len(plan), kind, ours, cin, cout, resample,
                       temb if kind == "resblock" else 0))

  res_name = lambda side, res: f"{side}_{res}x{res}"
  add("linear", "map_layer0", nf * model_config.channel_mult_noise, temb)
  add("linear", "map_layer1", temb, temb)
  add("conv", f"{res_name('enc', image_size)}_conv", channels, nf)
  skips, ch = [nf], nf
  for level, mult in enumerate(mults):
    res = image_size >> level
    for b in range(blocks):
      name = f"{res_name('enc', res)}_block{b}"
      add("resblock", name, ch, nf * mult)
      ch = nf * mult
      if res in attn:
        add("attention", name, ch, ch)
      skips.append(ch)
    if level < len(mults) - 1:
      add("resblock", f"{res_name('enc', res // 2)}_down", ch, ch, resample=True)
      skips.append(ch)
  low = res_name("dec", image_size >> (len(mults) - 1))
  add("resblock", f"{low}_in0", ch, ch)
  add("attention", f"{low}_in0", ch, ch)
  add("resblock", f"{low}_in1", ch, ch)
  for level in reversed(range(len(mults))):
    res = image_size >> level
    for b in range(blocks + 1):
      add("resblock", f"{res_name('dec', res)}_block{b}", ch + skips.pop(), nf * mults[level])
      ch = nf * mults[level]
    if res in attn:
      add("attention", f"{res_name('dec', res)}_block{blocks}", ch, ch)
    if level > 0:
      add("resblock", f"{res_name('dec', res * 2)}_up", ch, ch, resample=True)
  assert not skips
  add("norm", f"{res_name('dec', image_size)}_aux_norm", ch, ch)
  add("conv", f"{res_name('dec', image_size)}_aux_conv", ch, channels)
  return plan


# --------------------------------------------------------------------------------------------
# Tensors of one module (torch keys and shapes, in state-dict order) and its rules (our path,
# the torch keys it is made of, how).

def _pair(prefix, w_shape, b_len):
  return [(prefix + "weight", tuple(w_shape)), (prefix + "bias", (b_len,))]


def tensors(m: Module) -> List[Tuple[str, Shape]]:
  p = f"all_modules.{m.index}."
  if m.kind == "linear":
    return _pair(p, (m.cout, m.cin), m.cout)
  if m.kind == "conv":
    return _pair(p, (m.cout, m.cin, 3, 3), m.cout)
  if m.kind == "norm":
    return _pair(p, (m.cout,), m.cout)
  if m.kind == "resblock":
    out = (_pair(p + "GroupNorm_0.", (m.cin,), m.cin)
           + _pair(p + "Conv_0.", (m.cout, m.cin, 3, 3), m.cout)
           + _pair(p + "Dense_0.", (m.cout, m.temb), m.cout)
           + _pair(p + "GroupNorm_1.", (m.cout,), m.cout)
           + _pair(p + "Conv_1.", (m.cout, m.cout, 3, 3), m.cout))
    if m.shortcut:
      out += _pair(p + "Conv_2.", (m.cout, m.cin, 1, 1), m.cout)
    return out
  c = m.cout  # attention
  out = _pair(p + "GroupNorm_0.", (c,), c)
  for j in range(4):
    out += [(f"{p}NIN_{j}.W", (c, c)), (f"{p}NIN_{j}.b", (c,))]
  return out


Rule = Tuple[Tuple[str, ...], Tuple[str, ...], Callable[..., np.ndarray]]


def _qkv_kernel(q, k, v):
  # Our qkv output channel 3 c + j holds projection j (q, k, v) of channel c (EDM's layout).
  c = q.shape[0]
  return np.stack([q, k, v], axis=-1).reshape(c, 3 * c)[None, None]


def _qkv_bias(q, k, v):
  return np.stack([q, k, v], axis=-1).reshape(-1)


def _affine_rules(ours: Tuple[str, ...], torch_prefix: str, weight_fn) -> List[Rule]:
  return [(ours + ("kernel",), (torch_prefix + "weight",), weight_fn),
          (ours + ("bias",), (torch_prefix + "bias",), common.identity)]


def _norm_rules(ours: Tuple[str, ...], torch_prefix: str) -> List[Rule]:
  return [(ours + ("scale",), (torch_prefix + "weight",), common.identity),
          (ours + ("bias",), (torch_prefix + "bias",), common.identity)]


def rules(m: Module) -> List[Rule]:
  p, b = f"all_modules.{m.index}.", (m.ours,)
  if m.kind == "linear":
    return _affine_rules(b, p, common.linear_to_dense)
  if m.kind == "conv":
    return _affine_rules(b, p, common.conv_to_flax)
  if m.kind == "norm":
    return _norm_rules(b, p)
  if m.kind == "resblock":
    out = (_norm_rules(b + ("norm0",), p + "GroupNorm_0.")
           + _affine_rules(b + ("conv0",), p + "Conv_0.", common.conv_to_flax)
           + _affine_rules(b + ("affine",), p + "Dense_0.", common.linear_to_dense)
           + _norm_rules(b + ("norm1",), p + "GroupNorm_1.")
           + _affine_rules(b + ("conv1",), p + "Conv_1.", common.conv_to_flax))
    if m.shortcut:
      out += _affine_rules(b + ("skip",), p + "Conv_2.", common.conv_to_flax)
    return out
  nin = lambda j, w: f"{p}NIN_{j}.{w}"  # attention
  return (_norm_rules(b + ("norm2",), p + "GroupNorm_0.")
          + [(b + ("qkv", "kernel"), tuple(nin(j, "W") for j in range(3)), _qkv_kernel),
             (b + ("qkv", "bias"), tuple(nin(j, "b") for j in range(3)), _qkv_bias),
             (b + ("proj", "kernel"), (nin(3, "W"),), lambda w: np.asarray(w)[None, None]),
             (b + ("proj", "bias"), (nin(3, "b"),), common.identity)])


def key_shapes(model_config, image_size: int, channels: int) -> Dict[str, Shape]:
  """{torch key: shape} of every parameter tensor of this architecture, in state-dict order."""
  return {k: s for m in module_plan(model_config, image_size, channels) for k, s in tensors(m)}


# --------------------------------------------------------------------------------------------
# Reading the architecture off a state dict.


def _by_module(shapes: Mapping[str, Shape]) -> Dict[int, Dict[str, Shape]]:
  mods: Dict[int, Dict[str, Shape]] = {}
  for key, shape in shapes.items():
    parts = key.split(".", 2)
    if len(parts) == 3 and parts[0] == "all_modules" and parts[1].isdigit():
      mods.setdefault(int(parts[1]), {})[parts[2]] = tuple(shape)
  return mods


def infer_architecture(shapes: Mapping[str, Shape], image_size: int) -> Optional[dict]:
  """{model_channels, channel_mult, num_blocks, attn_resolutions} read off the module list.

  nf is the input conv's width (module 2). With several levels, a level is its run of
  residual blocks (each maybe followed by an attention block) up to a down block (a BigGAN
  block with a 1x1 shortcut but no channel change); its multiplier is the first block's width
  / nf and the block count is level 0's. A single level has no down block to end its run, so
  its block count follows from the number of modules. A guess counts only when its key list
  reproduces ``shapes`` exactly (channels taken from the input conv); otherwise None, and the
  config's values are used.
  """
  mods = _by_module(shapes)
  conv_in = mods.get(2, {}).get("weight", ())
  if len(conv_in) != 4:
    return None
  nf, channels = conv_in[0], conv_in[1]
  for guess in (_levels_guess(mods, nf, image_size), _one_level_guess(mods, nf, image_size)):
    if guess and _reproduces(guess, shapes, image_size, channels):
      return guess
  return None


def _is_resblock(mods, i):
  return "Conv_0.weight" in mods.get(i, {}) and "Dense_0.weight" in mods[i]


def _is_down(mods, i):  # a resampling BigGAN block: 1x1 shortcut without a channel change
  conv = mods[i]["Conv_0.weight"]
  return "Conv_2.weight" in mods[i] and conv[0] == conv[1]


def _is_attention(mods, i):
  return "NIN_0.W" in mods.get(i, {})


def _levels_guess(mods, nf, image_size) -> Optional[dict]:
  i, blocks, mults, attn = 3, None, [], []
  for level in range(32):
    n, width, attends = 0, None, False
    while (_is_resblock(mods, i) and not _is_down(mods, i)
           and (blocks is None or n < blocks)):
      width = width or mods[i]["Conv_0.weight"][0]
      i, n = i + 1, n + 1
      if _is_attention(mods, i):
        i, attends = i + 1, True
    blocks = n if blocks is None else blocks
    if n == 0 or n != blocks or width % nf:
      return None
    mults.append(width // nf)
    if attends:
      attn.append(image_size >> level)
    if not (_is_resblock(mods, i) and _is_down(mods, i)):
      break
    i += 1
  if len(mults) < 2:
    return None
  return dict(model_channels=nf, channel_mult=tuple(mults), num_blocks=blocks,
              attn_resolutions=tuple(sorted(attn)))


def _one_level_guess(mods, nf, image_size) -> Optional[dict]:
  # 3 + B (1 + a) encoder + 3 middle + (B + 1) + a decoder + 2 output modules, a = attention.
  if not _is_resblock(mods, 3):
    return None
  a = int(_is_attention(mods, 4))
  blocks, rest = divmod(len(mods) - 9 - a, 2 + a)
  width = mods[3]["Conv_0.weight"][0]
  if rest or blocks < 1 or width % nf:
    return None
  return dict(model_channels=nf, channel_mult=(width // nf,), num_blocks=blocks,
              attn_resolutions=(image_size,) if a else ())


def _reproduces(guess, shapes, image_size, channels) -> bool:
  config = dict(_REQUIRED, **guess)
  want = key_shapes(_Fields(config), image_size, channels)
  return want == {k: tuple(s) for k, s in shapes.items()}


class _Fields(dict):
  """A plain dict read like a ConfigDict (attribute and item access)."""
  __getattr__ = dict.__getitem__


# --------------------------------------------------------------------------------------------
# The checked conversion.


def problems(shapes: Mapping[str, Shape], expected: Mapping[str, Shape]):
  """(missing, unexpected, mis-shaped) keys of ``shapes`` against ``expected``."""
  missing = [(k, s) for k, s in expected.items() if k not in shapes]
  unexpected = [(k, tuple(s)) for k, s in shapes.items() if k not in expected]
  mismatched = [(k, s, tuple(shapes[k])) for k, s in expected.items()
                if k in shapes and tuple(shapes[k]) != tuple(s)]
  return missing, unexpected, mismatched


def mismatch_message(missing, unexpected, mismatched, what: str, limit: int = 6) -> str:
  """One error listing the first problems of each kind (a whole foreign checkpoint would
  otherwise print hundreds of lines)."""
  head = (f"The checkpoint does not hold {what}: {len(missing)} missing, {len(unexpected)} "
          f"unexpected, {len(mismatched)} mis-shaped tensor(s) (torch layout). First ones:")
  lines = [head]
  lines += [f"  missing     {k} {s}" for k, s in missing[:limit]]
  lines += [f"  unexpected  {k} {s}" for k, s in unexpected[:limit]]
  lines += [f"  mis-shaped  {k}: expected {e}, got {g}" for k, e, g in mismatched[:limit]]
  lines.append("  How to fix: this converter reads score_sde NCSN++ checkpoints with "
               "RectifiedFlow's CIFAR-10 options (DDPM++, BigGAN blocks, positional time "
               "embedding, no input/output pyramids); check that the file is such a "
               "checkpoint and that the config's data shape (channels) matches it.")
  return "\n".join(lines)


def params_from_state(state: Mapping[str, np.ndarray], model_config, image_size: int,
                      channels: int, what: str = "this network") -> dict:
  """Our nested params tree from a prefix-free, buffer-free state dict; every tensor checked.

  Raises common.ConversionError listing the first missing / unexpected / mis-shaped keys.
  """
  plan = module_plan(model_config, image_size, channels)
  expected = {k: s for m in plan for k, s in tensors(m)}
  found = problems({k: np.shape(v) for k, v in state.items()}, expected)
  if any(found):
    raise common.ConversionError(mismatch_message(*found, what=what))
  flat = {}
  for m in plan:
    for path, keys, fn in rules(m):
      flat[path] = np.asarray(fn(*(state[k] for k in keys)), np.float32)
  return common.unflatten(flat)
