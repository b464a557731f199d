"""Cut square crops from a few large pictures into an image-folder dataset.

  python -m detailflow_jax.data.crop_folder --source=DIR[,DIR...] --output=OUT --size=64

A handful of high-resolution photos (wallpapers, scans, a camera roll) becomes a training set of
small colour images in the layout `data.source = "folder"` reads: OUT/train/<class>/*.png and
OUT/test/<class>/*.png. The split is drawn per group, the folder directly under --source that a
picture lies in (or the picture itself when it lies at the top), so the test split holds
pictures the tokenizer never saw, nor their variants (wallpaper packages ship one picture in
light, dark and portrait versions side by side): a held-out part of the folder, not new crops
of training pictures. Side lengths are drawn log-uniformly between --min_side and the picture's
shorter side before the area-averaging resize to --size, so the set mixes wide views (smooth)
and close-ups (texture). The class of a crop is its group's name, or one class "images" with
--class_from_folder=false.
Deterministic for a given --seed and file set.
"""
import hashlib
import os
import pathlib
import sys

import numpy as np
from absl import app, flags
from PIL import Image

from detailflow_jax.data import image_folder

FLAGS = flags.FLAGS
flags.DEFINE_list("source", None, "folders searched recursively for pictures")
flags.DEFINE_string("output", None, "output dataset folder (OUT/train, OUT/test)")
flags.DEFINE_integer("size", 64, "side of the square output images in pixels")
flags.DEFINE_integer("crops_per_picture", 300, "crops cut from each source picture")
flags.DEFINE_integer("min_side", 128, "smallest crop side in source pixels")
flags.DEFINE_integer("min_picture_side", 512, "pictures with a shorter side are skipped")
flags.DEFINE_float("test_fraction", 0.15, "share of picture groups held out for the test split")
flags.DEFINE_bool("class_from_folder", True, "class = first folder level under the source")
flags.DEFINE_integer("seed", 0, "seed of the crop positions and sizes")


def find_pictures(sources):
  """(group, path, digest) of every picture under the sources, sorted; byte-identical copies
  dropped."""
  found, seen = [], set()
  for source in sources:
    root = pathlib.Path(source)
    if not root.is_dir():
      raise ValueError(f"--source {source!r} is not a folder")
    for path in sorted(root.rglob("*")):
      if not (path.is_file() and path.suffix.lower() in image_folder.IMAGE_EXTENSIONS):
        continue
      digest = hashlib.sha1(path.read_bytes()).hexdigest()
      if digest in seen:        # wallpaper packages ship the same file under several names
        continue
      seen.add(digest)
      relative = path.relative_to(root).parts
      found.append((relative[0] if len(relative) > 1 else path.stem, path, digest))
  return found


def is_test_group(group, test_fraction):
  """Split by a hash of the group's name: stable when pictures are added or removed."""
  digest = hashlib.sha1(group.encode()).hexdigest()
  return int(digest[:8], 16) / 0xFFFFFFFF < test_fraction


def random_crops(picture, count, size, min_side, rng):
  """`count` (size, size, 3) uint8 crops; sides log-uniform in [min_side, shorter side]."""
  height, width = picture.shape[:2]
  shorter = min(height, width)
  sides = np.exp(rng.uniform(np.log(min(min_side, shorter)), np.log(shorter), size=count))
  image = Image.fromarray(picture)
  crops = []
  for side in sides.astype(int):
    top = rng.integers(0, height - side + 1)
    left = rng.integers(0, width - side + 1)
    crop = image.crop((left, top, left + side, top + side))
    crops.append(np.asarray(crop.resize((size, size), Image.Resampling.BOX)))
  return crops


def write_crop_folder(sources, output, size=64, crops_per_picture=300, min_side=128,
                      min_picture_side=512, test_fraction=0.15, class_from_folder=True, seed=0):
  """Writes the dataset; returns {split: number of images}."""
  output = pathlib.Path(output)
  if output.exists() and any(output.iterdir()):
    raise ValueError(f"--output {output} exists and is not empty; choose a new folder")
  pictures = find_pictures(sources)
  if not pictures:
    raise ValueError(f"no pictures ({', '.join(image_folder.IMAGE_EXTENSIONS)}) under {sources}")
  counts = {"train": 0, "test": 0}
  for index, (group, path, digest) in enumerate(pictures):
    picture = image_folder.decode_image_file(path)
    if min(picture.shape[:2]) < min_picture_side:
      print(f"skip {path.name}: shorter side {min(picture.shape[:2])} < {min_picture_side}")
      continue
    split = "test" if is_test_group(group, test_fraction) else "train"
    folder = output / split / (group if class_from_folder else "images")
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, int(digest[:8], 16)])
    for k, crop in enumerate(random_crops(picture, crops_per_picture, size, min_side, rng)):
      Image.fromarray(crop).save(folder / f"{digest[:12]}_{k:04d}.png")
    counts[split] += crops_per_picture
    print(f"[{index + 1}/{len(pictures)}] {split}: {crops_per_picture} crops of {path.name}",
          flush=True)
  if not counts["train"] or not counts["test"]:
    raise ValueError(f"one split is empty ({counts}); change --test_fraction or add pictures")
  return counts


def main(argv):
  del argv
  if not FLAGS.source or not FLAGS.output:
    sys.exit("give --source (one or more folders of pictures) and --output (a new folder)")
  counts = write_crop_folder(FLAGS.source, FLAGS.output, FLAGS.size, FLAGS.crops_per_picture,
                             FLAGS.min_side, FLAGS.min_picture_side, FLAGS.test_fraction,
                             FLAGS.class_from_folder, FLAGS.seed)
  print(f"wrote {counts['train']} train and {counts['test']} test images of "
        f"{FLAGS.size}x{FLAGS.size} to {os.fspath(FLAGS.output)}")


if __name__ == "__main__":
  app.run(main)
