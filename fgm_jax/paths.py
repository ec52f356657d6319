"""The one path layer: every file fgm_jax reads or writes, on a local disk or in a gs:// bucket.

etils' ``epath`` does the work for both. For gs:// it is told to use gcsfs (fsspec), not
TensorFlow's GCS file system, which it would pick whenever TensorFlow is installed: gcsfs
follows ``STORAGE_EMULATOR_HOST``, so the code that talks to a real bucket is the code tested
against a GCS emulator (tests/integration/test_gcs_bucket.py), while TensorFlow's has Google's endpoint
compiled in and cannot be pointed anywhere else. ``EPATH_USE_TF=true`` in the environment
gives TensorFlow's back. TensorBoard event files are written through this layer too
(``MirroredWriter``), since TensorFlow's summary writer would reach the bucket on its own.

Local writes go to a temporary file that is renamed into place, so a crash never leaves half
a file under the final name. A bucket object only appears once its upload completes, so
bucket writes go straight to the final name (GCS renames are a copy and a delete).
"""

import io
import json
import os
import shutil
import tempfile
import time

os.environ.setdefault("EPATH_USE_TF", "false")  # gs:// through gcsfs (see above)

import fsspec  # noqa: E402
from etils import epath  # noqa: E402

# gcsfs keeps folder listings for ever by default; a bucket is also written by TensorStore and
# by the other hosts of a run, so a kept listing would miss new checkpoints. List afresh.
fsspec.config.conf.setdefault("gcs", {}).setdefault("use_listings_cache", False)


def is_remote(path) -> bool:
  return "://" in str(path)


def path(p) -> epath.Path:
  """An epath.Path; local paths made absolute (as every caller expects them)."""
  return epath.Path(p if is_remote(p) else os.path.abspath(p))


def absolute(p) -> str:
  """os.path.abspath for local paths; a gs:// URL unchanged (abspath would mangle it)."""
  return str(path(p))


def exists(p) -> bool:
  return path(p).exists()


def is_file(p) -> bool:
  return path(p).is_file()


def is_dir(p) -> bool:
  return path(p).is_dir()


def makedirs(p):
  """Creates a folder and its parents (on a bucket: nothing to create, object names carry
  the folders)."""
  path(p).mkdir(parents=True, exist_ok=True)


def listdir(p) -> list:
  """The names in a folder, sorted."""
  return sorted(child.name for child in path(p).iterdir())


def remove(p):
  path(p).unlink()


def read_bytes(p) -> bytes:
  return path(p).read_bytes()


def read_text(p) -> str:
  return path(p).read_text()


def read_json(p):
  return json.loads(read_text(p))


def write_bytes(p, data: bytes, tmp_tag=None):
  """Writes ``data`` whole: a reader never sees a half-written file under this name.
  ``tmp_tag`` names the local temporary file instead of the pid (processes on several hosts
  writing one shared folder can have the same pid)."""
  target = path(p)
  if is_remote(target):
    target.write_bytes(data)
    return
  tmp = target.parent / f".{target.name}.{os.getpid() if tmp_tag is None else tmp_tag}.tmp"
  tmp.write_bytes(data)
  tmp.replace(target)


def write_text(p, text: str):
  write_bytes(p, text.encode("utf-8"))


def write_json(p, obj):
  write_text(p, json.dumps(obj, indent=2, sort_keys=True))


def create_exclusive(p, data: bytes) -> bool:
  """Writes ``data`` to ``p`` only if nothing is there yet; False when something is. Of two
  processes racing, exactly one gets True: O_EXCL on a local disk, and in a gs:// bucket
  GCS's precondition ifGenerationMatch=0 ("only if no object has this name")."""
  if not is_remote(p):
    try:
      fd = os.open(absolute(p), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      return False
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    return True
  if not str(p).startswith("gs://"):
    raise ValueError(f"{p}: only local paths and gs:// buckets can hold a workdir lock; "
                     "use one of those for --workdir.")
  import fsspec
  try:
    fsspec.filesystem("gs").pipe_file(str(p), data, mode="create")
  except FileExistsError:
    return False
  return True


def save_npz(p, **arrays):
  """numpy's .npz of ``arrays``, written whole."""
  import numpy as np
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  write_bytes(p, buf.getvalue())


def load_npz(p, keys=None) -> dict:
  """Every array of an .npz file (or only ``keys``), read into memory (no pickles). With
  ``keys`` only their parts of the file are read (ranged reads in a bucket)."""
  import numpy as np
  if keys is None:
    with np.load(io.BytesIO(read_bytes(p)), allow_pickle=False) as f:
      return {k: f[k] for k in f.files}
  with path(p).open("rb") as raw, np.load(raw, allow_pickle=False) as f:
    return {k: f[k] for k in keys}


def rmtree(p):
  """Removes a folder and everything in it; nothing happens if it is not there."""
  if exists(p):
    path(p).rmtree()


def upload(local_file: str, p):
  """Copies a local file to ``p`` (local or in a bucket) without reading it into memory: in
  a bucket an object appears only when its upload completes; locally a copy."""
  if not is_remote(p):
    shutil.copyfile(local_file, absolute(p))
    return
  fs, remote = fsspec.core.url_to_fs(str(p))
  fs.put_file(local_file, remote)


class MirroredWriter:
  """A clu metric writer for a workdir in a bucket: TensorFlow writes the TensorBoard events
  to a local folder, and each flush (at least every ``every_s`` seconds of writing) uploads
  the event files whole to ``<workdir>``, as TensorFlow's own GCS writer re-uploads a file at
  every flush. Events written after the last upload are lost with the process."""

  def __init__(self, workdir: str, every_s: float = 60.0):
    from clu import metric_writers
    self._local = tempfile.mkdtemp(prefix="fgm_jax_events_")
    self._inner = metric_writers.create_default_writer(self._local)
    self._target, self._every_s, self._uploaded = workdir, every_s, time.time()

  def __getattr__(self, name):
    attr = getattr(self._inner, name)
    if not name.startswith("write_"):
      return attr

    def write(*args, **kwargs):
      result = attr(*args, **kwargs)
      if time.time() - self._uploaded > self._every_s:
        self.flush()
      return result
    return write

  def flush(self):
    self._inner.flush()
    self._upload()

  def close(self):
    self._inner.close()
    self._upload()
    shutil.rmtree(self._local, ignore_errors=True)

  def _upload(self):
    for name in os.listdir(self._local):
      with open(os.path.join(self._local, name), "rb") as f:
        write_bytes(os.path.join(self._target, name), f.read())
    self._uploaded = time.time()
