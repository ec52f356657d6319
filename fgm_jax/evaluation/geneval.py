"""GenEval (Ghosh et al., 2023): a text-to-image model's images in GenEval's folder layout, and
the six-category table from the official scorer's results.jsonl.

1. Generate (the SD3 sampling job calls this with its one-step sampler):

    prompts = geneval.read_metadata("../shared/data/geneval/evaluation_metadata.jsonl")
    geneval.write_images(prompts, "runs/geneval/images", sample_fn, batch_size=16, seed=0)

   writes

    OUT/geneval_run.json          seed, images per prompt, caller's settings (resume guard)
    OUT/00000/metadata.jsonl      the prompt's line of the metadata file, byte for byte
    OUT/00000/grid.png            (grid=True) the prompt's images in a row
    OUT/00000/samples/0000.png ... 0003.png
    OUT/00001/...

   A folder is named by the prompt's line in the metadata file, and image k of prompt i is
   drawn from noise id ``i * images_per_prompt + k``, so a subset run (``limit``/``tags``)
   writes exactly the folders and images a full run would, whatever the batching.

2. Score (external, one GPU; GenEval's repository, an object detector and CLIP):

    python evaluation/evaluate_images.py OUT --outfile results.jsonl --model-path <detector dir>

   It reads only folders with all-digit names and ``samples/<digits>.png``, so this module's
   run file and temporary names (``samples/.0000.png.tmp``) are invisible to it.

3. Summarise:

    python -m fgm_jax.evaluation.geneval summary results.jsonl [--out summary.json]
    python -m fgm_jax.evaluation.geneval check OUT [--metadata FILE]   (all prompts complete?)

Scores follow GenEval's evaluation/summary_scores.py: a category's score is the fraction of its
images judged correct; the overall score is the mean of the category scores (not of all
images); a prompt counts as correct when at least one of its images is ("% correct prompts").
A results file lacking some categories still gets a table, with the overall score taken over
the categories present and flagged (``missing``), since it is not comparable to published ones.
"""

import argparse
import dataclasses
import io
import json
import os
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
from absl import logging

from fgm_jax import paths

CATEGORIES = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
DEFAULT_METADATA = "../shared/data/geneval/evaluation_metadata.jsonl"
RUN_FILE = "geneval_run.json"
METADATA_FILE = "metadata.jsonl"
GRID_FILE = "grid.png"
FORMAT = "fgm_jax.geneval/1"
_TMP = ".tmp"  # suffix of files being written; they start with '.', which the scorer skips


class GenEvalError(ValueError):
  """A GenEval input that cannot be used; the message names the file and the fix."""


class GenEvalFileError(GenEvalError, FileNotFoundError):
  """A missing GenEval file."""


# ---------------------------------------------------------------------------------- prompts


@dataclasses.dataclass(frozen=True)
class Prompt:
  """One line of GenEval's evaluation_metadata.jsonl."""
  index: int       # position among the file's prompts: folder name and noise ids
  line: str        # the JSON line as written in the file, without its newline
  # The parsed line (tag, include, optional exclude, prompt); follows from `line`, so left
  # out of equality and hashing.
  metadata: dict = dataclasses.field(compare=False)

  @property
  def prompt(self) -> str:
    return self.metadata["prompt"]

  @property
  def tag(self) -> str:
    return self.metadata["tag"]

  @property
  def folder(self) -> str:
    return f"{self.index:05d}"


def _line_problem(record) -> Optional[str]:
  if not isinstance(record, dict):
    return "is not a JSON object"
  for key, kind, what in (("tag", str, "text"), ("prompt", str, "text"),
                          ("include", list, "list")):
    if not isinstance(record.get(key), kind):
      return f"has no {key!r} {what}"
  return None


def _jsonl(path: str, hint: str):
  """(line number, line, parsed JSON) of each non-blank line; a line that is not JSON stops
  with its number and ``hint``."""
  # newline=None: the lines open() would give (universal newlines), from a disk or a bucket.
  text = io.StringIO(paths.read_bytes(path).decode("utf-8"), newline=None)
  for number, raw in enumerate(text, start=1):
    line = raw.rstrip("\r\n")
    if not line.strip():
      continue
    try:
      yield number, line, json.loads(line)
    except json.JSONDecodeError as e:
      raise GenEvalError(f"{path} line {number} is not JSON ({e.msg}); {hint}") from None


def read_metadata(path: str = DEFAULT_METADATA, *, limit: Optional[int] = None,
                  tags: Optional[Sequence[str]] = None) -> List[Prompt]:
  """The prompts of a GenEval metadata file, optionally only ``tags`` and the first ``limit``.

  Blank lines are skipped; a prompt keeps its index in the whole file whatever the selection.
  """
  if not path or not paths.is_file(path):
    raise GenEvalFileError(
        f"GenEval metadata file {path!r} not found; it ships as {DEFAULT_METADATA} (relative to "
        "the repository root) and as prompts/evaluation_metadata.jsonl in djghosh13/geneval.")
  prompts = []
  for number, line, record in _jsonl(path, "each line of a GenEval metadata file is one JSON "
                                           "object."):
    problem = _line_problem(record)
    if problem:
      raise GenEvalError(f"{path} line {number} {problem}; GenEval metadata lines hold 'tag', "
                         "'include' (list), optional 'exclude' and 'prompt'.")
    prompts.append(Prompt(len(prompts), line, record))
  if not prompts:
    raise GenEvalError(f"GenEval metadata file {path} holds no prompts.")
  if tags is not None:
    tags = [tags] if isinstance(tags, str) else list(tags)
    unknown = sorted(set(tags) - {p.tag for p in prompts})
    if unknown:
      raise GenEvalError(f"tags {unknown} do not occur in {path}; its tags are "
                         f"{sorted({p.tag for p in prompts})}.")
    prompts = [p for p in prompts if p.tag in set(tags)]
  if limit is not None:
    if limit < 1:
      raise GenEvalError(f"limit={limit} must be >= 1 (or None for every prompt).")
    prompts = prompts[:limit]
  return prompts


# ---------------------------------------------------------------------------------- writing


def sample_name(k: int) -> str:
  return f"{k:04d}.png"


def noise_id(prompt: Prompt, k: int, images_per_prompt: int) -> int:
  """The noise of image k of a prompt: the same whatever batch or process draws it."""
  return prompt.index * images_per_prompt + k


def _names(folder: str) -> set:
  """The names in ``folder``; none if it is not there (a bucket has no empty folders)."""
  try:
    return set(paths.listdir(folder))
  except FileNotFoundError:
    return set()


def missing_images(prompt: Prompt, out_dir: str, images_per_prompt: int) -> List[int]:
  """The k whose samples/<k>.png is not written yet (PNGs a killed run finished are kept)."""
  # One listing, not a request per image (each is a round trip in a bucket).
  there = _names(os.path.join(out_dir, prompt.folder, "samples"))
  return [k for k in range(images_per_prompt) if sample_name(k) not in there]


def is_complete(prompt: Prompt, out_dir: str, images_per_prompt: int) -> bool:
  """metadata.jsonl (written last) and every PNG present."""
  return (paths.is_file(os.path.join(out_dir, prompt.folder, METADATA_FILE))
          and not missing_images(prompt, out_dir, images_per_prompt))


def _write_atomic(path: str, data: bytes):
  """A killed writer leaves no file under the final name that is not whole: on a disk it
  writes under a temporary name beginning with '.' (.<name>.<pid>.tmp) and renames; a bucket
  object appears only once uploaded (paths.write_bytes)."""
  paths.write_bytes(path, data)


def _png_bytes(image: np.ndarray) -> bytes:
  import io
  from PIL import Image
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="PNG")
  return buf.getvalue()


def _read_png(path: str) -> np.ndarray:
  from PIL import Image
  with Image.open(io.BytesIO(paths.read_bytes(path))) as img:
    return np.asarray(img.convert("RGB"))


def as_uint8_images(images, count: int) -> np.ndarray:
  """sample_fn's output as uint8 (count, H, W, 3): uint8 kept, floats read as [0, 1]."""
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[0] != count or images.shape[-1] != 3:
    raise GenEvalError(f"sample_fn returned an array of shape {images.shape} for {count} "
                       f"prompts; it must return ({count}, H, W, 3) images.")
  if images.dtype == np.uint8:
    return images
  if not np.issubdtype(images.dtype, np.floating):
    raise GenEvalError(f"sample_fn returned {images.dtype} images; return uint8 in [0, 255] "
                       "or floats in [0, 1].")
  return np.clip(np.round(images.astype(np.float32) * 255), 0, 255).astype(np.uint8)


def image_row(images: Sequence[np.ndarray], pad: int = 2) -> np.ndarray:
  """Images side by side on black, ``pad`` pixels around each (GenEval's grid.png look)."""
  h = max(i.shape[0] for i in images)
  w = sum(i.shape[1] for i in images) + pad * (len(images) + 1)
  row = np.zeros((h + 2 * pad, w, 3), np.uint8)
  x = pad
  for img in images:
    row[pad:pad + img.shape[0], x:x + img.shape[1]] = img
    x += img.shape[1] + pad
  return row


def _check_run_file(out_dir: str, wanted: dict, process_index: int):
  """Refuses an output folder started with other settings; writes the run file otherwise."""
  path = os.path.join(out_dir, RUN_FILE)
  if paths.is_file(path):
    saved = paths.read_json(path)
    diff = ", ".join(f"{k}: {saved.get(k)!r} there, {wanted.get(k)!r} now"
                     for k in sorted(set(saved) | set(wanted)) if saved.get(k) != wanted.get(k))
    if diff:
      raise GenEvalError(f"{out_dir} holds GenEval images made with other settings ({diff}); "
                         "use a new output folder.")
    return
  # Every process writes the same bytes under its own temporary name: no race matters.
  paths.write_bytes(path, json.dumps(wanted, indent=2, sort_keys=True).encode("utf-8"),
                    tmp_tag=f"p{process_index}")


def _check_prompt_folder(prompt: Prompt, out_dir: str):
  """Refuses a folder whose metadata.jsonl holds another prompt (another metadata file)."""
  meta = os.path.join(out_dir, prompt.folder, METADATA_FILE)
  if paths.is_file(meta):
    there = paths.read_bytes(meta).decode("utf-8").rstrip("\r\n")
    if there != prompt.line:
      raise GenEvalError(f"{meta} holds another prompt ({there[:80]!r}) than line "
                         f"{prompt.index + 1} of the metadata file ({prompt.line[:80]!r}); use "
                         "a new output folder or the metadata file this one was written from.")


def _prepare_prompt(prompt: Prompt, out_dir: str):
  """Creates the prompt's folders and drops temporary files a killed run left there."""
  folder = os.path.join(out_dir, prompt.folder)
  samples = os.path.join(folder, "samples")
  paths.makedirs(samples)
  for d in (folder, samples):
    for name in _names(d):
      if name.startswith(".") and name.endswith(_TMP):
        paths.remove(os.path.join(d, name))


def _finish_prompt(prompt: Prompt, out_dir: str, images_per_prompt: int, grid: bool):
  folder = os.path.join(out_dir, prompt.folder)
  if grid:
    images = [_read_png(os.path.join(folder, "samples", sample_name(k)))
              for k in range(images_per_prompt)]
    _write_atomic(os.path.join(folder, GRID_FILE), _png_bytes(image_row(images)))
  # Last: its presence is what marks the prompt complete.
  _write_atomic(os.path.join(folder, METADATA_FILE), (prompt.line + "\n").encode("utf-8"))


def write_images(metadata: Sequence[Prompt], out_dir: str,
                 sample_fn: Callable[[List[str], List[int]], np.ndarray], *,
                 images_per_prompt: int = 4, batch_size: int, seed: int,
                 process_index: int = 0, process_count: int = 1, grid: bool = False,
                 settings: Optional[dict] = None, progress: bool = True) -> dict:
  """Writes ``images_per_prompt`` images of each prompt in GenEval's layout under ``out_dir``.

  sample_fn(prompts, noise_ids) -> (len(prompts), H, W, 3) images, uint8 or floats in [0, 1]
  (clipped, rounded to 8 bits): one image per (prompt text, noise id); noise id
  ``prompt.index * images_per_prompt + k`` for image k. It always gets exactly ``batch_size``
  items (a short last batch repeats its last item; the extra images are dropped), so one
  compiled shape serves every call; with a multi-device sampler make ``batch_size`` a
  multiple of the devices it splits over.

  Process ``process_index`` of ``process_count`` handles the prompts with
  ``index % process_count == process_index`` (each process writes its own prompt folders;
  with one folder per host, gather them before scoring).

  Resumable: prompts whose PNGs and metadata.jsonl are all present are skipped; of an
  unfinished prompt only the missing PNGs are drawn (each file is renamed into place whole,
  metadata.jsonl last). ``seed`` (the seed sample_fn draws its noise with: it does not receive
  it, close over the same value), ``images_per_prompt`` and ``settings`` (anything else the
  images depend on, e.g. checkpoint and step) are recorded in geneval_run.json; resuming
  into a folder written with other values is refused.

  Returns counts: prompts (this process's), skipped (already complete), images (written now),
  batches, seconds.
  """
  if images_per_prompt < 1 or batch_size < 1:
    raise GenEvalError(f"images_per_prompt={images_per_prompt} and batch_size={batch_size} "
                       "must be >= 1.")
  if not 0 <= process_index < process_count:
    raise GenEvalError(f"process_index={process_index} must lie in [0, {process_count}).")
  start = time.time()
  paths.makedirs(out_dir)
  run = {"format": FORMAT, "seed": int(seed), "images_per_prompt": int(images_per_prompt),
         "settings": dict(settings or {})}
  # Through JSON once, so tuples compare equal to the lists the saved file gives back.
  _check_run_file(out_dir, json.loads(json.dumps(run)), process_index)
  mine = [p for p in metadata if p.index % process_count == process_index]
  for p in mine:
    _check_prompt_folder(p, out_dir)
  todo = [p for p in mine if not is_complete(p, out_dir, images_per_prompt)]
  work = []  # (prompt, k) of every image still to draw, in prompt order
  for p in todo:
    _prepare_prompt(p, out_dir)
    work += [(p, k) for k in missing_images(p, out_dir, images_per_prompt)]
  # Prompts with every PNG but no metadata.jsonl (killed between the two): finish them now.
  for p in todo:
    if not missing_images(p, out_dir, images_per_prompt):
      _finish_prompt(p, out_dir, images_per_prompt, grid)
  batches = (len(work) + batch_size - 1) // batch_size
  if progress:
    logging.info("GenEval: process %d/%d, %d prompts, %d complete, %d images to draw in %d "
                 "batches of %d", process_index, process_count, len(mine),
                 len(mine) - len(todo), len(work), batches, batch_size)
  from fgm_jax import progress as progress_lib  # here: `summary` need not import jax
  meter = None
  for b in range(batches):
    items = work[b * batch_size:(b + 1) * batch_size]
    count = len(items)
    padded = items + [items[-1]] * (batch_size - count)
    batch_start = time.time()
    images = as_uint8_images(
        sample_fn([p.prompt for p, _ in padded],
                  [noise_id(p, k, images_per_prompt) for p, k in padded]), batch_size)[:count]
    for (p, k), image in zip(items, images):
      _write_atomic(os.path.join(out_dir, p.folder, "samples", sample_name(k)),
                    _png_bytes(image))
    for p in dict.fromkeys(p for p, _ in items):  # prompts touched, once each, in order
      if not missing_images(p, out_dir, images_per_prompt):
        _finish_prompt(p, out_dir, images_per_prompt, grid)
    if not progress:
      continue
    if meter is None:  # the first batch compiles: time it alone, count the rate from after it
      logging.info("GenEval: first batch of %d images in %.1f s (includes compiling)", count,
                   time.time() - batch_start)
      meter = progress_lib.Meter("GenEval images", len(work) - count, unit="images")
    else:
      meter.advance(count)
  if progress:
    logging.info("GenEval: process %d wrote %d images in %.1f s", process_index, len(work),
                 time.time() - start)
  return {"prompts": len(mine), "skipped": len(mine) - len(todo), "images": len(work),
          "batches": batches, "seconds": time.time() - start}


def check_folder(metadata: Sequence[Prompt], out_dir: str, images_per_prompt: int = 4) -> dict:
  """Which prompts of ``metadata`` are complete in ``out_dir`` (before running the scorer)."""
  if not paths.is_dir(out_dir):
    raise GenEvalFileError(f"{out_dir} is not a folder; give the folder write_images wrote.")
  incomplete = [p.folder for p in metadata if not is_complete(p, out_dir, images_per_prompt)]
  return {"prompts": len(metadata), "complete": len(metadata) - len(incomplete),
          "incomplete": incomplete}


# ---------------------------------------------------------------------------------- summary


def read_results(path: str) -> List[dict]:
  """The rows of the official scorer's results.jsonl, each checked for 'tag' and 'correct'."""
  if not path or not paths.is_file(path):
    raise GenEvalFileError(
        f"GenEval results file {path!r} not found; write it with GenEval's "
        "evaluation/evaluate_images.py <image folder> --outfile results.jsonl.")
  rows = []
  for number, _, row in _jsonl(path, "is this the results.jsonl of GenEval's "
                                     "evaluate_images.py?"):
    if not isinstance(row, dict) or not isinstance(row.get("tag"), str):
      raise GenEvalError(f"{path} line {number} has no 'tag' string; is this the "
                         "results.jsonl of GenEval's evaluate_images.py?")
    if not isinstance(row.get("correct"), bool):
      raise GenEvalError(f"{path} line {number} has no true/false 'correct' field (got "
                         f"{row.get('correct')!r}); is this the results.jsonl of GenEval's "
                         "evaluate_images.py?")
    if row["tag"] not in CATEGORIES:
      raise GenEvalError(f"{path} line {number} has tag {row['tag']!r}, not one of GenEval's "
                         f"categories {list(CATEGORIES)}.")
    rows.append(row)
  if not rows:
    raise GenEvalError(f"GenEval results file {path} holds no results; did the scorer run on "
                       "the image folder?")
  return rows


def _prompt_key(row: dict):
  # summary_scores.py groups images by their 'metadata' string (one per prompt line).
  return row.get("metadata", row.get("prompt", row.get("filename")))


def summarize(results_path: str) -> dict:
  """GenEval's scores from a results.jsonl (see the module docstring for the definitions).

  Returns {"overall", "categories": {tag: {"score", "correct", "images", "prompts"}} in
  GenEval's order, "missing": absent categories, "complete": none missing, "images",
  "correct_images", "image_accuracy", "prompts", "prompt_accuracy", "results"}.
  """
  rows = read_results(results_path)
  categories = {}
  for tag in CATEGORIES:
    tagged = [r for r in rows if r["tag"] == tag]
    if not tagged:
      continue
    correct = sum(r["correct"] for r in tagged)
    categories[tag] = {"score": correct / len(tagged), "correct": correct,
                       "images": len(tagged),
                       "prompts": len({_prompt_key(r) for r in tagged})}
  missing = [t for t in CATEGORIES if t not in categories]
  by_prompt: Dict[object, bool] = {}
  for r in rows:
    by_prompt[_prompt_key(r)] = by_prompt.get(_prompt_key(r), False) or r["correct"]
  correct_images = sum(r["correct"] for r in rows)
  return {
      "overall": float(np.mean([c["score"] for c in categories.values()])),
      "categories": categories,
      "missing": missing,
      "complete": not missing,
      "images": len(rows),
      "correct_images": correct_images,
      "image_accuracy": correct_images / len(rows),
      "prompts": len(by_prompt),
      "prompt_accuracy": sum(by_prompt.values()) / len(by_prompt),
      "results": paths.absolute(results_path),
  }


def format_table(summary: dict) -> str:
  """A markdown table: one row per category, then the overall score and the totals."""
  lines = ["| category | score | correct / images | prompts |", "|---|---:|---:|---:|"]
  for tag in CATEGORIES:
    c = summary["categories"].get(tag)
    if c:
      lines.append(f"| {tag} | {c['score']:.4f} | {c['correct']} / {c['images']} | "
                   f"{c['prompts']} |")
    else:
      lines.append(f"| {tag} | missing | - | - |")
  n = len(summary["categories"])
  lines.append(f"| **overall** (mean of {n} categories) | **{summary['overall']:.4f}** | "
               f"{summary['correct_images']} / {summary['images']} | {summary['prompts']} |")
  lines.append("")
  lines.append(f"Correct images: {summary['image_accuracy']:.2%}; prompts with at least one "
               f"correct image: {summary['prompt_accuracy']:.2%}.")
  if summary["missing"]:
    lines.append(f"**Incomplete:** no results for {', '.join(summary['missing'])}; the overall "
                 f"score is the mean of the {n} categories present and is not comparable to "
                 "published GenEval scores.")
  return "\n".join(lines)


# ---------------------------------------------------------------------------------- command line


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m fgm_jax.evaluation.geneval",
                                   description=__doc__.split("\n")[0])
  sub = parser.add_subparsers(dest="command", required=True)
  s = sub.add_parser("summary", help="six-category table from GenEval's results.jsonl")
  s.add_argument("results")
  s.add_argument("--out", help="also write the summary as JSON here")
  c = sub.add_parser("check", help="are all prompts of the metadata file complete in OUT?")
  c.add_argument("out_dir")
  c.add_argument("--metadata", default=DEFAULT_METADATA)
  c.add_argument("--images_per_prompt", type=int, default=4)
  args = parser.parse_args(argv)
  try:
    if args.command == "summary":
      summary = summarize(args.results)
      print(format_table(summary))
      if args.out:
        _write_atomic(paths.absolute(args.out),
                      json.dumps(summary, indent=2).encode("utf-8"))
      return 0
    status = check_folder(read_metadata(args.metadata), args.out_dir, args.images_per_prompt)
    print(f"{args.out_dir}: {status['complete']}/{status['prompts']} prompts complete"
          + (f"; incomplete: {' '.join(status['incomplete'][:20])}"
             + (" ..." if len(status["incomplete"]) > 20 else "")
             if status["incomplete"] else ""))
    return 0 if not status["incomplete"] else 1
  except GenEvalError as e:
    print(f"geneval {args.command}: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
