"""Bytes per device of an SD3-Medium FGM run's train state and frozen teacher, as built.

    python experiments/sd3_state_memory.py            # 8 fake CPU devices, fsdp 1, 2, 4, 8

Builds the real FGMTrainer of configs/sd3_fgm.py with SD3-Medium's architecture
(abstractly: shapes and shardings only, no weights, nothing compiled) and sums, for one
device, the shard of every leaf: generator and online-flow fp32 weights, their Adam states
(the frozen positional table has none), the generator EMA if kept, and the frozen teacher in
config.fgm.teacher_dtype. Activations and gradients come on top (sd3_memory_estimate.md §4).
"""

import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from configs import sd3_fgm  # noqa: E402
from fgm_jax import sharding as sharding_lib  # noqa: E402
from fgm_jax.models import mmdit  # noqa: E402
from fgm_jax.sd3 import trainer as sd3_trainer  # noqa: E402
from fgm_jax.train import trainers  # noqa: E402


def device_bytes(abstract, shardings, dtype=None):
  """Bytes of the leaves' shards on the first device."""
  total = 0
  for a, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings)):
    itemsize = np.dtype(dtype or a.dtype).itemsize
    total += int(np.prod(s.shard_shape(a.shape))) * itemsize
  return total


def main():
  rows = []
  for fsdp in (1, 2, 4, 8):
    c = sd3_fgm.get_config()
    c.teacher.model.update(mmdit.SD3_MEDIUM)
    c.mesh.fsdp, c.batch_size = fsdp, 8
    c.teacher.latent_shape = (64, 64, 16)  # 512 px
    trainer = sd3_trainer.build_abstract(c, sharding_lib.mesh_from_config(c.mesh))
    state = device_bytes(trainer.abstract_state, trainer.shardings)
    teacher_abstract = trainer.abstract_teacher
    teacher = device_bytes(teacher_abstract, trainer.param_shardings, c.fgm.teacher_dtype)
    adam = device_bytes(trainer.abstract_state.gen_opt_state,
                        trainers.sharding_lib.tree_shardings(
                            trainer.abstract_state.gen_opt_state, trainer.mesh))
    rows.append((fsdp, state, teacher, adam))
    print(f"fsdp={fsdp}: state {state / 1e9:.2f} GB (generator Adam {adam / 1e9:.2f} GB), "
          f"teacher {teacher / 1e9:.2f} GB, together {(state + teacher) / 1e9:.2f} GB "
          "per device", flush=True)
  print("\n| fsdp | train state / device | of which generator Adam | teacher (bf16) | sum |")
  print("|---|---|---|---|---|")
  for fsdp, state, teacher, adam in rows:
    print(f"| {fsdp} | {state / 1e9:.2f} GB | {adam / 1e9:.2f} GB | {teacher / 1e9:.2f} GB "
          f"| {(state + teacher) / 1e9:.2f} GB |")


if __name__ == "__main__":
  main()
