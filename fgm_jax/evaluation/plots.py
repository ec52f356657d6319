"""Pictures people would rather look at than read: 2-D scatter panels and image grids."""

import io
import math
import os
from typing import Dict, Sequence

import numpy as np

from fgm_jax import paths

GRID_IMAGES = 64  # per panel: an 8 x 8 grid
SCATTER_POINTS = 5000


def _figure_to_array(fig) -> np.ndarray:
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
  buf.seek(0)
  from PIL import Image
  return np.asarray(Image.open(buf).convert("RGB"))


def _save_figure(fig, path: str, dpi: int):
  """A matplotlib figure as a PNG file, on a disk or in a bucket."""
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
  paths.write_bytes(path, buf.getvalue())


def scatter_panels(clouds: Dict[str, np.ndarray], path: str = None, lim: float = 4.5,
                   max_points: int = 5000) -> np.ndarray:
  """One scatter panel per named 2-D point cloud; returns the RGB image, writes PNG if path."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, len(clouds), figsize=(3.2 * len(clouds), 3.4), squeeze=False)
  for ax, (name, pts) in zip(axes[0], clouds.items()):
    pts = np.asarray(pts)[:max_points]
    ax.scatter(pts[:, 0], pts[:, 1], s=1, alpha=0.4)
    ax.set_xlim(-lim, lim), ax.set_ylim(-lim, lim), ax.set_aspect("equal")
    ax.set_title(name, fontsize=9), ax.set_xticks([]), ax.set_yticks([])
  image = _figure_to_array(fig)
  if path:
    _save_figure(fig, path, dpi=100)
  plt.close(fig)
  return image


def image_grid(images: np.ndarray, ncols: int = None, pad: int = 1) -> np.ndarray:
  """(N, H, W, C) images in [-1, 1] -> one uint8 (rows*H, cols*W, 3) grid."""
  images = np.clip((np.asarray(images, np.float32) + 1) * 127.5, 0, 255).astype(np.uint8)
  if images.shape[-1] == 1:
    images = np.repeat(images, 3, axis=-1)
  n, h, w, c = images.shape
  ncols = ncols or int(math.ceil(math.sqrt(n)))
  nrows = int(math.ceil(n / ncols))
  grid = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), 255, np.uint8)
  for i, img in enumerate(images):
    r, col = divmod(i, ncols)
    grid[pad + r * (h + pad):pad + r * (h + pad) + h,
         pad + col * (w + pad):pad + col * (w + pad) + w] = img
  return grid


def save_png(path: str, image: np.ndarray, upscale: int = 1):
  """Writes a PNG to a local path or a gs:// bucket."""
  from PIL import Image
  img = Image.fromarray(image)
  if upscale > 1:
    img = img.resize((img.width * upscale, img.height * upscale), Image.NEAREST)
  buf = io.BytesIO()
  img.save(buf, format="PNG")
  paths.write_bytes(path, buf.getvalue())


def labelled_grids(grids: Dict[str, np.ndarray], path: str, panel_inches: float = 3.2):
  """Image grids side by side, each titled with its name, saved as a PNG."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, len(grids), figsize=(panel_inches * len(grids),
                                                   panel_inches + 0.4), squeeze=False)
  for ax, (name, grid) in zip(axes[0], grids.items()):
    # Nearest-neighbour keeps 8x8 digits crisp instead of smearing them.
    ax.imshow(grid, interpolation="nearest")
    ax.set_title(name, fontsize=10)
    ax.set_xticks([]), ax.set_yticks([])
  _save_figure(fig, path, dpi=120)
  plt.close(fig)


def sample_sets_figure(sets: Sequence, picture: str, folder: str) -> str:
  """samples.png (picture='scatter': 2-D points) or grids.png (image grids) of labelled sample
  sets (train.sampling.SampleSet), panels in the given order; returns the file name."""
  if picture == "scatter":
    path = os.path.join(folder, "samples.png")
    scatter_panels({s.label: s.x[:SCATTER_POINTS] for s in sets}, path=path)
  else:
    path = os.path.join(folder, "grids.png")
    labelled_grids({s.label: image_grid(s.x[:GRID_IMAGES], ncols=8) for s in sets}, path)
  return os.path.basename(path)
