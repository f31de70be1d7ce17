"""Checks of `config.data` before anything reads data: the image fields every mode uses, and (in
the modes that read data) whether the dataset is known, its label count and its image size.

Each source checks its own fields (`check` of the registry's source, data/sources.py); only tfds
metadata is read (dataset_info.json); TensorFlow is imported only by the modes that read data.
"""

from __future__ import annotations

from typing import List

from diffusion_jax.data import sources


def _check_data_fields(errors: List[str], config) -> None:
  """data.* fields every mode reads (image shape, the source's own fields such as data.folder)."""
  data = config.data
  if data.channels not in (1, 3):
    errors.append(f'data.channels={data.channels} must be 1 (grayscale) or 3 (RGB).')
  if data.resolution <= 0:
    errors.append(f'data.resolution={data.resolution} must be positive.')
  errors.extend(sources.source_of(data).check(data))
  if data.center_crop < 0:
    errors.append(f'data.center_crop={data.center_crop} must be >= 0 (0 = crop to the short '
                  'side; e.g. 140 for CelebA).')


def _check_data_source(errors: List[str], config, mode: str) -> None:
  """Is the dataset known, and (training a class-conditional model) does its label count match
  model.num_classes? Reads tfds metadata only (dataset_info.json, no TF graph)."""
  data, model = config.data, config.model
  errors.extend(sources.check_name(str(data.dataset)))
  if data.center_crop > 0 and not errors:
    _check_center_crop(errors, data)
  if mode != 'train' or model.num_classes <= 0 or errors:
    return
  if not sources.source_of(data).has_labels(data):
    errors.append('model.num_classes > 0 needs labels: set data.label_key (e.g. "label").')
    return
  from diffusion_jax.data import pipeline  # pylint: disable=g-import-not-at-top (imports TensorFlow)
  try:
    found = pipeline.num_classes_of(data)
  except (FileNotFoundError, OSError):
    return  # Not prepared / unreadable: the input pipeline reports it with the fix.
  except ValueError as e:  # Unknown label_key, missing folder: already names the field.
    errors.append(str(e))
    return
  if found != model.num_classes:
    errors.append(f'model.num_classes={model.num_classes} but data.dataset={data.dataset!r} has '
                  f'{found} classes (data.label_key={data.label_key!r}); set '
                  f'--config.model.num_classes={found}.')


def _check_center_crop(errors: List[str], data) -> None:
  """data.center_crop must fit in the images where their size is known (digits, tfds
  features of static shape; read from metadata). Where `image_size` is None (folders) the first
  image read that is too small names the field."""
  from diffusion_jax.data import pipeline  # pylint: disable=g-import-not-at-top (imports TensorFlow)
  try:
    size = pipeline.image_size_of(data)
  except (ValueError, OSError):
    return  # Unknown dataset or unreadable metadata: reported elsewhere with the fix.
  if size is not None and data.center_crop > min(size):
    errors.append(f'data.center_crop={data.center_crop} is larger than the {size[0]}x{size[1]} '
                  f'images of data.dataset={data.dataset!r}; set it to at most {min(size)} '
                  '(or 0 to crop to the short side).')


def check_data_config(config, mode: str) -> List[str]:
  """Problems with `config.data` for `mode` (empty list = fine); each names the field and the
  fix. The dataset itself is looked at only in the modes that read it (train, eval)."""
  errors: List[str] = []
  _check_data_fields(errors, config)
  if mode in ('train', 'eval'):
    _check_data_source(errors, config, mode)
  return errors
