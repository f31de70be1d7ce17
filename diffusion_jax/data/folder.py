"""The 'folder' source: PNG/JPEG files under `data.folder` (local or gs://).

Example i is the i-th image file in sorted path order; with `data.label_key` set it is labelled
by the sorted index of its top-level sub-folder (root/<class>/.../<image>). Files are read and
decoded per example, so any number of images of any sizes work.
"""

from __future__ import annotations

from collections.abc import Sequence
import posixpath
from typing import Any

import numpy as np

from diffusion_jax.data import base

NAME = 'folder'
_IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg')


def _root(data_config) -> str:
  """Returns `data.folder` after checking that it exists."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top (TensorFlow: gfile reads gs://)
  root = str(data_config.folder or '')
  if not root:
    raise ValueError("data.dataset='folder' needs data.folder to be set.")
  if not tf.io.gfile.isdir(root):
    raise ValueError(f'data.folder={root!r} does not exist or is not a folder.')
  return root.rstrip('/') or '/'


def _classes(root: str) -> list[str]:
  """Returns the sorted names of the immediate sub-folders of `root`."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top (TensorFlow: gfile reads gs://)
  return sorted(
      name.rstrip('/')
      for name in tf.io.gfile.listdir(root)
      if tf.io.gfile.isdir(posixpath.join(root, name.rstrip('/')))
  )


def _examples(data_config) -> tuple[list[str], list[int] | None]:
  """Lists the image files under `data.folder` (sorted) and their class labels."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top (TensorFlow: gfile reads gs://)
  root = _root(data_config)
  paths = []
  for dirpath, _, filenames in tf.io.gfile.walk(root):
    for filename in filenames:
      if filename.lower().endswith(_IMAGE_EXTENSIONS):
        paths.append(posixpath.join(dirpath, filename))
  paths.sort()
  if not paths:
    raise ValueError(
        f'data.folder={root!r} holds no images (*.png, *.jpg, *.jpeg).'
    )
  if not has_labels(data_config):
    return paths, None
  index = {name: i for i, name in enumerate(_classes(root))}
  labels = []
  for path in paths:
    relative = path[len(root):].lstrip('/')
    top = relative.split('/', 1)[0]
    if '/' not in relative or top not in index:
      raise ValueError(
          f'{path!r} is not inside a class sub-folder of data.folder={root!r}; '
          "labelled folders (data.label_key != '') need root/<class>/<image>."
      )
    labels.append(index[top])
  return paths, labels


def _read_image_file(path: Any) -> Any:
  """Decodes one PNG/JPEG file to uint8 [H, W, 3] (grayscale is tiled, alpha dropped)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top (TensorFlow: inside tf.data)
  image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
  return tf.ensure_shape(image, [None, None, 3])


def has_labels(data_config) -> bool:
  """Whether data.label_key is set (the class is the top-level sub-folder)."""
  return bool(data_config.label_key)


def num_classes(data_config) -> int:
  """The number of class sub-folders of data.folder."""
  return len(_classes(_root(data_config)))


def image_size(data_config) -> None:
  """Unknown: the files may have any sizes (a too large data.center_crop fails when read)."""
  del data_config
  return None


def indexed(data_config, split: str) -> base.IndexedSource:
  """The sorted image files of data.folder; a file is read and decoded per example."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top (TensorFlow: the records' specs)
  del split
  paths, labels = _examples(data_config)
  paths_np = np.asarray(paths, object)
  labels_np = None if labels is None else np.asarray(labels, np.int32)

  def read(indices: Sequence[int]) -> dict[str, Any]:
    out = {'path': paths_np[np.asarray(indices, np.int64)]}
    if labels_np is not None:
      out['label'] = labels_np[np.asarray(indices, np.int64)]
    return out

  signature = {'path': tf.TensorSpec([], tf.string)}
  if labels_np is not None:
    signature['label'] = base.label_spec()
  arrays = {'path': paths_np} if labels_np is None else {'path': paths_np, 'label': labels_np}
  return base.IndexedSource(len(paths), read, signature, lambda r: _read_image_file(r['path']),
                            arrays)


def check(data_config) -> list[str]:
  """data.folder must be set (whether it exists is seen when it is read)."""
  if data_config.folder:
    return []
  return ["data.folder is empty but data.dataset='folder': set "
          '--config.data.folder=/path/to/images.']
