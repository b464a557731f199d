"""Any image classification dataset prepared with TFDS, read through `tfds.data_source`.

Random access needs the array_record file format, which `tfds build --file_format=array_record`
writes. imagenet2012 cannot be downloaded by TFDS: its archives must be put in the manual
folder first (see `prepare_instructions`).
"""
import numpy as np


def prepare_instructions(name, data_dir):
  """How to make `name` readable by this source, as text for error messages."""
  target = f" --data_dir={data_dir}" if data_dir else ""
  text = (f"prepare it with `tfds build {name}{target} --file_format=array_record` "
          f"(config keys data.tfds_name='{name}', data.tfds_data_dir='{data_dir}')")
  if name.startswith("imagenet2012"):
    text += ("; for imagenet2012 first download ILSVRC2012_img_train.tar and "
             "ILSVRC2012_img_val.tar from image-net.org into the manual folder "
             "(<data_dir>/downloads/manual, or pass --manual_dir=FOLDER to tfds build)")
  return text


def _diagnose(tfds, name, split, data_dir, error):
  """A ValueError that says why `name`/`split` could not be opened and how to fix it."""
  first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
  if isinstance(error, tfds.core.registered.DatasetNotFoundError):
    return ValueError(f"TFDS has no dataset named '{name}' (config key data.tfds_name): "
                      f"{first_line}")
  try:
    builder = tfds.builder(name, data_dir=data_dir or None)
    prepared = builder.is_prepared()
    file_format = str(builder.info.file_format) if prepared else ""
    splits = sorted(builder.info.splits.keys()) if prepared else []
  except Exception:  # pylint: disable=broad-except  # diagnosis only; report the first error
    prepared, file_format, splits = False, "", []
  where = data_dir or "~/tensorflow_datasets"
  if not prepared:
    return ValueError(f"TFDS dataset '{name}' is not prepared in data_dir='{where}': "
                      f"{prepare_instructions(name, data_dir)}")
  if "array_record" not in file_format.lower():
    return ValueError(f"TFDS dataset '{name}' in '{where}' is stored as {file_format}, but "
                      f"random access needs array_record: {prepare_instructions(name, data_dir)}")
  if splits and split.split("[")[0] not in splits:
    return ValueError(f"TFDS dataset '{name}' has no split '{split}' (config keys "
                      f"data.train_split / data.eval_split); it has {splits}")
  return ValueError(f"TFDS could not open '{name}' split '{split}' in '{where}' "
                    f"({type(error).__name__}: {first_line})")


def _to_rgb(image):
  image = np.asarray(image)
  if image.ndim == 2:
    image = image[:, :, None]
  if image.shape[-1] == 1:
    return np.repeat(image, 3, axis=2)
  if image.shape[-1] == 4:  # RGBA: drop alpha
    return image[:, :, :3]
  if image.shape[-1] != 3:
    raise ValueError(f"TFDS image has {image.shape[-1]} channels; expected 1, 3 or 4")
  return image


class TFDSSource:
  """Random-access source (grain-compatible): record i -> dict(image=(H, W, 3) uint8, label=int)."""

  def __init__(self, name, split, data_dir="", image_key="image", label_key="label"):
    # Imported here: tensorflow_datasets is slow to import and only this source needs it.
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    try:
      # download=False: never start a multi-hour download/preparation from a training job.
      self._source = tfds.data_source(name, split=split, data_dir=data_dir or None,
                                      download=False)
    except Exception as error:  # pylint: disable=broad-except  # re-raised with a diagnosis
      raise _diagnose(tfds, name, split, data_dir, error) from error
    features = self._source.dataset_info.features
    for key in (image_key, label_key):
      if key not in features:
        raise ValueError(f"TFDS dataset '{name}' has no feature '{key}'; it has "
                         f"{sorted(features.keys())} (an image classification dataset is needed)")
    self.num_classes = int(features[label_key].num_classes)
    self.name, self.split = name, split
    self._image_key, self._label_key = image_key, label_key

  def __len__(self):
    return len(self._source)

  def __getitem__(self, index):
    record = self._source[int(index)]
    return dict(image=_to_rgb(record[self._image_key]), label=int(record[self._label_key]))

  def __repr__(self):
    return f"TFDSSource({self.name!r}, split={self.split!r}, len={len(self)})"
