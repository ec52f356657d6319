"""In-memory sources that are pure functions of (seed, step), and their prefetching stream.

The digits and the tfds sources hold their whole split in host memory and sample from it
here (``ArraySource``); ``RowSource`` does the same for conditioning rows. There is no
iterator state: example ``k = step * global_batch + j`` of the stream is
``perm(seed, k // n)[k % n]``, a fresh permutation per epoch, so ``batch(step)`` is the same in
a resumed run as in an uninterrupted one, and the same whatever the number of processes.
"""

import functools
import queue
import threading

import numpy as np

# Distinct tags keep the permutation and flip random streams independent for one seed.
_PERM_TAG = 0
_FLIP_TAG = 1


def check_batch_args(global_batch: int, process_index: int, process_count: int) -> int:
  """Validates the batch split; returns the per-process batch size."""
  if global_batch <= 0:
    raise ValueError(f"global_batch={global_batch} must be positive.")
  if process_count <= 0:
    raise ValueError(f"process_count={process_count} must be positive.")
  if not 0 <= process_index < process_count:
    raise ValueError(
        f"process_index={process_index} must be in [0, process_count={process_count}).")
  if global_batch % process_count:
    raise ValueError(
        f"global_batch (the global batch size) = {global_batch} is not divisible by "
        f"process_count = {process_count}; every process must get the same number of rows.")
  return global_batch // process_count


@functools.lru_cache(maxsize=8)
def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
  """Order of the n examples in one epoch; read-only since it is cached and shared."""
  perm = np.random.default_rng([seed, _PERM_TAG, epoch]).permutation(n)
  perm.flags.writeable = False
  return perm


def example_indices(seed: int, step: int, n: int, global_batch: int, start: int,
                    stop: int) -> np.ndarray:
  """Dataset indices of rows [start, stop) of the global batch at `step`."""
  positions = step * global_batch + np.arange(start, stop, dtype=np.int64)
  epochs, offsets = np.divmod(positions, n)
  out = np.empty(stop - start, dtype=np.int64)
  # A batch spans at most a few epochs, so loop over those rather than per row.
  for epoch in np.unique(epochs):
    rows = epochs == epoch
    out[rows] = epoch_permutation(seed, int(epoch), n)[offsets[rows]]
  return out


def flip_mask(seed: int, step: int, global_batch: int, start: int, stop: int) -> np.ndarray:
  """Which rows of [start, stop) to flip; drawn for the whole global batch so slices agree."""
  coins = np.random.default_rng([seed, _FLIP_TAG, step]).random(global_batch)
  return coins[start:stop] < 0.5


class ArraySource:
  """Samples NHWC images held in memory, scaled from [0, max_value] to [-1, 1].

  Images can stay in their stored dtype (uint8 CIFAR-10 is 4x smaller than float32); rows are
  converted only when they are drawn.
  """

  def __init__(self, images: np.ndarray, seed: int, *, max_value: float,
               random_flip: bool = False, labels=None):
    if images.ndim != 4:
      raise ValueError(f"images must be NHWC, got shape {images.shape}.")
    if len(images) == 0:
      raise ValueError("the image set is empty.")
    self.images = images
    self.labels = labels
    self.seed = int(seed)
    self.max_value = float(max_value)
    self.random_flip = bool(random_flip)

  @property
  def shape(self):
    return tuple(self.images.shape[1:])

  def __len__(self):
    return len(self.images)

  def batch(self, step: int, global_batch: int, process_index: int = 0,
            process_count: int = 1) -> np.ndarray:
    local = check_batch_args(global_batch, process_index, process_count)
    start, stop = process_index * local, (process_index + 1) * local
    idx = example_indices(self.seed, int(step), len(self.images), global_batch, start, stop)
    x = self.images[idx].astype(np.float32) * (2.0 / self.max_value) - 1.0
    if self.random_flip:
      flip = flip_mask(self.seed, int(step), global_batch, start, stop)
      x[flip] = x[flip, :, ::-1]
    return x


class RowSource:
  """Rows of a pytree of equal-length arrays held in memory, drawn like ``ArraySource``.

  For conditioning that travels as data (e.g. a cache of prompt embeddings): the rows of batch
  ``step`` are a pure function of (seed, step), so a resumed run draws the same ones.
  """

  def __init__(self, tree, seed: int):
    import jax  # tree utilities only; keeps this module importable without jax
    self._tree_map = jax.tree.map
    lengths = {len(x) for x in jax.tree.leaves(tree)}
    if len(lengths) != 1 or 0 in lengths:
      raise ValueError(f"RowSource needs non-empty arrays of one length; got lengths "
                       f"{sorted(lengths)}.")
    self.tree = tree
    self.seed = int(seed)
    self.num_rows = lengths.pop()

  def batch(self, step: int, global_batch: int, process_index: int = 0,
            process_count: int = 1):
    local = check_batch_args(global_batch, process_index, process_count)
    start, stop = process_index * local, (process_index + 1) * local
    idx = example_indices(self.seed, int(step), self.num_rows, global_batch, start, stop)
    return self._tree_map(lambda x: np.asarray(x)[idx], self.tree)


def prefetch(source, start_step: int, global_batch: int, process_index: int = 0,
             process_count: int = 1, depth: int = 2, stop_step=None):
  """Yields (step, batch) from start_step on, computing up to `depth` batches ahead.

  A daemon thread fills a bounded queue. Closing the generator (or dropping it) sets a stop
  flag and joins the thread, so no producer outlives its consumer. Errors in the producer
  are re-raised in the consumer.
  """
  check_batch_args(global_batch, process_index, process_count)
  q = queue.Queue(maxsize=max(1, depth))
  stop = threading.Event()

  def put(item) -> bool:
    # Time out regularly so a stopped consumer is noticed even while the queue is full.
    while not stop.is_set():
      try:
        q.put(item, timeout=0.05)
        return True
      except queue.Full:
        pass
    return False

  def produce():
    step = start_step
    try:
      while not stop.is_set() and (stop_step is None or step < stop_step):
        x = source.batch(step, global_batch, process_index, process_count)
        if not put(("batch", step, x)):
          return
        step += 1
      put(("end", None, None))
    except BaseException as e:  # handed to the consumer, which re-raises it
      put(("error", None, e))

  thread = threading.Thread(target=produce, name="fgm_jax-prefetch", daemon=True)
  thread.start()
  try:
    while True:
      tag, step, payload = q.get()
      if tag == "end":
        return
      if tag == "error":
        raise payload
      yield step, payload
  finally:
    stop.set()
    thread.join()


class StepStream:
  """This process's slice of batch ``step`` of a step-keyed source, computed ahead.

  Holds one ``prefetch`` generator; a request for any step other than the next one (the first
  call, a resume, a jump) restarts it there, so callers just ask for the step they are at.
  """

  def __init__(self, source, global_batch: int, process_index: int = 0,
               process_count: int = 1, depth: int = 2):
    check_batch_args(global_batch, process_index, process_count)
    self.source, self.global_batch, self.depth = source, global_batch, depth
    self.process_index, self.process_count = process_index, process_count
    self._stream, self._next = None, None

  def __call__(self, step: int):
    if self._stream is None or step != self._next:
      self.close()
      self._stream = prefetch(self.source, step, self.global_batch, self.process_index,
                              self.process_count, depth=self.depth)
    got, local = next(self._stream)
    self._next = got + 1
    return local

  def close(self):
    if self._stream is not None:
      self._stream.close()  # stops and joins the prefetch thread
      self._stream = None
