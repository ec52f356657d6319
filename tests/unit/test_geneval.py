"""GenEval: the folder layout its scorer reads (names, metadata lines, PNGs), resume after a
killed run, sharding over processes, noise ids independent of batching; the summary table
against totals counted here by other means; one clear line for bad inputs."""

import json
import os
import re
import zlib

import numpy as np
import pytest
from PIL import Image

from fgm_jax.evaluation import geneval
from tests import helpers

REAL_METADATA = os.path.join(helpers.ROOT, geneval.DEFAULT_METADATA)
NUM_PROMPTS, PER_PROMPT, H, W = 10, 4, 6, 10  # H != W: a transposed image would show


@pytest.fixture(scope="module")
def metadata_file(tmp_path_factory):
  """The real 553-prompt file when the shared data is beside the repository; otherwise
  (a clone elsewhere) 12 lines in its format, so the layout is still checked."""
  if os.path.isfile(REAL_METADATA):
    return REAL_METADATA
  path = tmp_path_factory.mktemp("meta") / "evaluation_metadata.jsonl"
  objects = ["bench", "cow", "bicycle", "clock", "carrot", "suitcase"]
  lines = [json.dumps({"tag": "single_object", "include": [{"class": o, "count": 1}],
                       "prompt": f"a photo of a {o}"}) for o in objects]
  lines += [json.dumps({"tag": "counting", "include": [{"class": o, "count": 2}],
                        "exclude": [{"class": o, "count": 3}], "prompt": f"a photo of two {o}s"})
            for o in objects]
  path.write_text("\n".join(lines) + "\n")
  return str(path)


def source_lines(path):
  """The file's lines as bytes, newline included: what metadata.jsonl must equal."""
  with open(path, "rb") as f:
    return [line for line in f.read().split(b"\n") if line.strip()]


def fake_image(prompt: str, noise: int) -> np.ndarray:
  """A stand-in sampler: the image is a function of (prompt, noise id) only."""
  rng = np.random.default_rng([zlib.crc32(prompt.encode()), noise])
  return rng.integers(0, 256, (H, W, 3), dtype=np.uint8)


class FakeSampler:
  """Records every call; optionally fails on call number ``fail_at`` (a killed run)."""

  def __init__(self, fail_at=None):
    self.calls, self.fail_at = [], fail_at

  def __call__(self, prompts, noise_ids):
    if self.fail_at is not None and len(self.calls) == self.fail_at:
      raise KeyboardInterrupt("killed")
    self.calls.append((list(prompts), list(noise_ids)))
    return np.stack([fake_image(p, n) for p, n in zip(prompts, noise_ids)])

  def noise_ids(self):
    return {n for _, ids in self.calls for n in ids}


def tree(out_dir):
  """{relative path: bytes} of every file the scorer reads (digit folders, digit PNGs) and
  metadata.jsonl / grid.png."""
  out = {}
  for folder in sorted(os.listdir(out_dir)):
    if not (folder.isdigit() and os.path.isdir(os.path.join(out_dir, folder))):
      continue
    for name in ("metadata.jsonl", "grid.png"):
      p = os.path.join(out_dir, folder, name)
      if os.path.isfile(p):
        out[f"{folder}/{name}"] = open(p, "rb").read()
    samples = os.path.join(out_dir, folder, "samples")
    for name in sorted(os.listdir(samples)):
      if re.match(r"\d+\.png", name):  # the scorer's own test (a prefix match)
        out[f"{folder}/samples/{name}"] = open(os.path.join(samples, name), "rb").read()
  return out


def png(data: bytes) -> np.ndarray:
  import io
  return np.asarray(Image.open(io.BytesIO(data)))


def write(prompts, out_dir, sampler, batch_size=3, **kw):
  return geneval.write_images(prompts, str(out_dir), sampler, images_per_prompt=PER_PROMPT,
                              batch_size=batch_size, seed=0, progress=False, **kw)


@pytest.fixture(scope="module")
def prompts(metadata_file):
  return geneval.read_metadata(metadata_file, limit=NUM_PROMPTS)


@pytest.fixture(scope="module")
def reference(prompts, tmp_path_factory):
  """One uninterrupted single-process run with grids: the files every other run must equal."""
  out = tmp_path_factory.mktemp("reference")
  sampler = FakeSampler()
  counts = write(prompts, out, sampler, grid=True)
  return out, tree(out), sampler, counts


def test_layout(metadata_file, prompts, reference):
  out, files, sampler, counts = reference
  lines = source_lines(metadata_file)
  assert counts["prompts"] == NUM_PROMPTS and counts["images"] == NUM_PROMPTS * PER_PROMPT
  assert sorted(os.listdir(out)) == [f"{i:05d}" for i in range(NUM_PROMPTS)] + ["geneval_run.json"]
  for i in range(NUM_PROMPTS):
    folder = f"{i:05d}"
    assert files[f"{folder}/metadata.jsonl"] == lines[i] + b"\n"
    assert json.loads(lines[i])["prompt"] == prompts[i].prompt
    assert sorted(os.listdir(out / folder / "samples")) == ["0000.png", "0001.png", "0002.png",
                                                            "0003.png"]
    images = []
    for k in range(PER_PROMPT):
      image = png(files[f"{folder}/samples/{k:04d}.png"])
      assert image.shape == (H, W, 3) and image.dtype == np.uint8
      np.testing.assert_array_equal(image, fake_image(prompts[i].prompt, i * PER_PROMPT + k))
      images.append(image)
    grid = png(files[f"{folder}/grid.png"])
    assert grid.shape == (H + 4, PER_PROMPT * (W + 2) + 2, 3)
    np.testing.assert_array_equal(grid[2:2 + H, 2 + (W + 2):2 + (W + 2) + W], images[1])
  # Every call got exactly batch_size items: one compiled shape.
  assert {len(p) for p, _ in sampler.calls} == {3}
  assert len(sampler.calls) == -(-NUM_PROMPTS * PER_PROMPT // 3)


def test_resume_skips_finished_and_redoes_broken(prompts, reference, tmp_path):
  import shutil
  ref_out, ref_files, _, _ = reference
  out = tmp_path / "out"
  shutil.copytree(ref_out, out)
  again = FakeSampler()
  counts = write(prompts, out, again, grid=True)
  assert again.calls == [] and counts["skipped"] == NUM_PROMPTS and counts["images"] == 0
  # What a killed run can leave: a lost PNG beside a temporary one, a prompt whose PNGs are
  # all written but not its metadata.jsonl, a prompt folder that was never finished.
  os.remove(out / "00003" / "samples" / "0002.png")
  (out / "00003" / "samples" / ".0002.png.999.tmp").write_bytes(b"half a png")
  os.remove(out / "00007" / "metadata.jsonl")
  os.remove(out / "00009" / "metadata.jsonl")
  os.remove(out / "00009" / "samples" / "0000.png")
  os.remove(out / "00009" / "samples" / "0003.png")
  assert not geneval.is_complete(prompts[3], str(out), PER_PROMPT)
  redo = FakeSampler()
  counts = write(prompts, out, redo, batch_size=8, grid=True)
  assert redo.noise_ids() == {3 * 4 + 2, 9 * 4 + 0, 9 * 4 + 3}
  assert counts["skipped"] == NUM_PROMPTS - 3 and counts["images"] == 3
  assert tree(out) == ref_files
  assert not [n for n in os.listdir(out / "00003" / "samples") if n.endswith(".tmp")]


@pytest.mark.parametrize("kill", ["sampler", "file_write"])
def test_killed_run_resumes_to_the_same_files(prompts, reference, tmp_path, monkeypatch, kill):
  _, ref_files, _, _ = reference
  killed = FakeSampler(fail_at=4 if kill == "sampler" else None)
  if kill == "file_write":  # killed in the middle of a batch's files: the 11th file
    real, written = geneval._write_atomic, []

    def dying_write(path, data):
      if len(written) == 10:
        raise KeyboardInterrupt("killed")
      written.append(path)
      real(path, data)
    monkeypatch.setattr(geneval, "_write_atomic", dying_write)
  with pytest.raises(KeyboardInterrupt):
    write(prompts, tmp_path, killed, grid=True)
  monkeypatch.undo()
  # A prompt with metadata.jsonl counts as done: each such prompt has all its images.
  partial = tree(tmp_path)
  done = [k.split("/")[0] for k in partial if k.endswith("metadata.jsonl")]
  assert done == (["00000", "00001", "00002"] if kill == "sampler" else ["00000"])
  for folder in done:
    assert all(f"{folder}/samples/{k:04d}.png" in partial for k in range(PER_PROMPT))
  resumed = FakeSampler()
  write(prompts, tmp_path, resumed, grid=True)
  first_missing = 12 if kill == "sampler" else 8  # 10 files: 4 PNGs, grid, meta, 4 PNGs
  assert resumed.noise_ids() == set(range(first_missing, NUM_PROMPTS * PER_PROMPT))
  assert tree(tmp_path) == ref_files


def test_sharding_covers_every_prompt_once(prompts, reference, tmp_path):
  _, ref_files, _, _ = reference
  samplers = [FakeSampler(), FakeSampler()]
  for p, sampler in enumerate(samplers):
    counts = write(prompts, tmp_path, sampler, process_index=p, process_count=2, grid=True)
    assert counts["prompts"] == NUM_PROMPTS // 2
  drawn = [{n // PER_PROMPT for n in s.noise_ids()} for s in samplers]
  assert drawn[0] == set(range(0, NUM_PROMPTS, 2)) and drawn[1] == set(range(1, NUM_PROMPTS, 2))
  assert tree(tmp_path) == ref_files


def test_images_do_not_depend_on_batch_size(prompts, reference, tmp_path, caplog):
  import logging
  _, ref_files, _, _ = reference
  sampler = FakeSampler()
  caplog.set_level(logging.INFO, logger="absl")  # absl keeps its own level
  geneval.write_images(prompts, str(tmp_path), sampler, batch_size=8, seed=0, grid=True)
  assert {len(p) for p, _ in sampler.calls} == {8}  # the reference ran with batch_size 3
  assert "40 images to draw in 5 batches of 8" in caplog.text
  assert "first batch of 8 images" in caplog.text
  assert "GenEval images: 32/32 images" in caplog.text and "ETA" in caplog.text
  assert tree(tmp_path) == ref_files


def test_float_images_are_rounded(prompts, tmp_path):
  rng = np.random.default_rng(0)
  q = rng.integers(-20, 276, (H, W, 3))  # beyond [0, 255] too: clipped
  x = ((q + rng.uniform(-0.4, 0.4, q.shape)) / 255).astype(np.float32)  # no rounding ties
  geneval.write_images(prompts[:1], str(tmp_path), lambda ps, ids: np.stack([x] * len(ps)),
                       batch_size=2, seed=0, progress=False)
  image = np.asarray(Image.open(tmp_path / "00000" / "samples" / "0000.png"))
  np.testing.assert_array_equal(image, np.clip(q, 0, 255))


def test_refuses_other_settings_and_other_prompts(prompts, tmp_path):
  write(prompts[:2], tmp_path, FakeSampler())
  with pytest.raises(geneval.GenEvalError, match="seed: 0 there, 1 now.*new output folder"):
    geneval.write_images(prompts[:2], str(tmp_path), FakeSampler(), batch_size=3, seed=1,
                         progress=False)
  shifted = [geneval.Prompt(p.index, q.line, q.metadata) for p, q in zip(prompts[:2],
                                                                          prompts[2:4])]
  with pytest.raises(geneval.GenEvalError, match="00000/metadata.jsonl holds another prompt"):
    write(shifted, tmp_path, FakeSampler())
  with pytest.raises(geneval.GenEvalError, match=r"shape \(3, 6, 10\) for 3 prompts"):
    write(prompts[2:3], tmp_path / "bad", lambda ps, ids: np.zeros((3, H, W), np.uint8))


# ---------------------------------------------------------------------------------- summary

COUNTS = {"single_object": (5, 4), "two_object": (3, 2), "counting": (4, 3), "colors": (2, 1),
          "position": (6, 4), "color_attr": (1, 3)}  # tag: (prompts, images per prompt)


def make_results(path, tags=tuple(COUNTS), seed=0):
  """A results.jsonl like evaluate_images.py writes, random verdicts, uneven counts per tag;
  returns the rows as (tag, prompt id, correct)."""
  rng = np.random.default_rng(seed)
  rows, lines, pid = [], [], 0
  for tag in tags:
    prompts, per = COUNTS[tag]
    for _ in range(prompts):
      meta = {"tag": tag, "include": [{"class": "cow", "count": 1}], "prompt": f"prompt {pid}"}
      for k in range(per):
        correct = bool(rng.random() < 0.6)
        rows.append((tag, pid, correct))
        lines.append(json.dumps({
            "filename": f"out/{pid:05d}/samples/{k:04d}.png", "tag": tag,
            "prompt": meta["prompt"], "correct": correct, "reason": "",
            "metadata": json.dumps(meta), "details": "{}"}))
      pid += 1
  path.write_text("\n".join(lines) + "\n")
  return rows


def expected_summary(rows):
  tags = np.array([r[0] for r in rows])
  pids = np.array([r[1] for r in rows])
  correct = np.array([r[2] for r in rows], np.float64)
  per_tag = {t: correct[tags == t].mean() for t in geneval.CATEGORIES if (tags == t).any()}
  any_correct = [correct[pids == p].max() for p in np.unique(pids)]
  return per_tag, np.mean(list(per_tag.values())), correct.mean(), np.mean(any_correct)


def test_summary_matches_independent_counts(tmp_path, capsys):
  results = tmp_path / "results.jsonl"
  rows = make_results(results)
  per_tag, overall, image_acc, prompt_acc = expected_summary(rows)
  summary = geneval.summarize(str(results))
  assert summary["complete"] and summary["missing"] == []
  assert list(summary["categories"]) == list(geneval.CATEGORIES)
  for tag, (prompts, per) in COUNTS.items():
    c = summary["categories"][tag]
    assert c["score"] == pytest.approx(per_tag[tag], abs=1e-12)
    assert c["images"] == prompts * per and c["prompts"] == prompts
  assert summary["overall"] == pytest.approx(overall, abs=1e-12)
  # Uneven counts: the overall is the mean of categories, not of images.
  assert abs(overall - image_acc) > 1e-3
  assert summary["image_accuracy"] == pytest.approx(image_acc, abs=1e-12)
  assert summary["prompt_accuracy"] == pytest.approx(prompt_acc, abs=1e-12)
  assert summary["images"] == len(rows) and summary["prompts"] == sum(p for p, _ in
                                                                         COUNTS.values())
  assert geneval.main(["summary", str(results), "--out", str(tmp_path / "s.json")]) == 0
  table = capsys.readouterr().out
  for tag in geneval.CATEGORIES:
    n = sum(1 for r in rows if r[0] == tag)
    k = sum(1 for r in rows if r[0] == tag and r[2])
    assert f"| {tag} | {k / n:.4f} | {k} / {n} |" in table
  assert f"**{overall:.4f}**" in table and "Incomplete" not in table
  assert json.loads((tmp_path / "s.json").read_text())["overall"] == pytest.approx(overall)


def test_summary_flags_missing_categories(tmp_path, capsys):
  results = tmp_path / "results.jsonl"
  rows = make_results(results, tags=("single_object", "colors", "color_attr", "two_object"))
  per_tag, overall, _, _ = expected_summary(rows)
  summary = geneval.summarize(str(results))
  assert summary["missing"] == ["counting", "position"] and not summary["complete"]
  assert summary["overall"] == pytest.approx(overall, abs=1e-12) and len(per_tag) == 4
  assert geneval.main(["summary", str(results)]) == 0
  table = capsys.readouterr().out
  assert "| counting | missing |" in table
  assert "no results for counting, position" in table and "mean of 4 categories" in table


# ---------------------------------------------------------------------------------- bad inputs


def test_bad_metadata(tmp_path):
  with pytest.raises(geneval.GenEvalFileError,
                     match=r"'nowhere.jsonl' not found; it ships as \.\./shared/data/geneval/"
                           r"evaluation_metadata.jsonl.*djghosh13/geneval"):
    geneval.read_metadata("nowhere.jsonl")
  bad = tmp_path / "meta.jsonl"
  bad.write_text('{"tag": "colors", "include": [], "prompt": "a red cow"}\n\n{"tag": "colors"\n')
  with pytest.raises(geneval.GenEvalError, match="meta.jsonl line 3 is not JSON"):
    geneval.read_metadata(str(bad))
  bad.write_text('{"tag": "colors", "include": [], "prompt": "a red cow"}\n'
                 '{"tag": "colors", "prompt": "a blue cow"}\n')
  with pytest.raises(geneval.GenEvalError, match="line 2 has no 'include' list; GenEval"):
    geneval.read_metadata(str(bad))


def test_metadata_selection(metadata_file):
  everything = geneval.read_metadata(metadata_file)
  assert [p.index for p in everything] == list(range(len(everything)))
  lines = source_lines(metadata_file)
  counting = geneval.read_metadata(metadata_file, tags=["counting"], limit=3)
  expected = [i for i, line in enumerate(lines) if json.loads(line)["tag"] == "counting"][:3]
  assert [p.index for p in counting] == expected
  assert [p.line.encode() for p in counting] == [lines[i] for i in expected]
  with pytest.raises(geneval.GenEvalError, match=r"tags \['countin'\] do not occur"):
    geneval.read_metadata(metadata_file, tags=["countin"])


@pytest.mark.parametrize("content, message", [
    (None, "results file .* not found; write it with GenEval's evaluation/evaluate_images.py"),
    ("\n", "holds no results"),
    ('{"tag": "colors", "correct": true}\nnot json\n', "line 2 is not JSON"),
    ('{"tag": "colors", "correct": "yes"}\n', "line 1 has no true/false 'correct' field"),
    ('{"correct": true}\n', "line 1 has no 'tag' string"),
    ('{"tag": "texture", "correct": true}\n', "line 1 has tag 'texture', not one of"),
])
def test_bad_results(tmp_path, capsys, content, message):
  path = tmp_path / "results.jsonl"
  if content is not None:
    path.write_text(content)
  with pytest.raises(geneval.GenEvalError, match=message):
    geneval.summarize(str(path))
  assert geneval.main(["summary", str(path)]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and err.startswith("geneval summary: ")


def test_check_command(prompts, reference, metadata_file, capsys):
  out, _, _, _ = reference
  assert geneval.main(["check", str(out), "--metadata", metadata_file]) == 1  # 10 of all
  assert capsys.readouterr().out.startswith(f"{out}: {NUM_PROMPTS}/")
  assert geneval.check_folder(prompts, str(out)) == {"prompts": NUM_PROMPTS,
                                                     "complete": NUM_PROMPTS, "incomplete": []}
