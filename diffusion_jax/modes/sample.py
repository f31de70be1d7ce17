"""`--mode=sample`: writes `samples.npz` (uint8 NHWC in `arr_0`, labels in `arr_1` for
class-conditional models), a PNG grid and, with `sample.animation`, `animation.gif`.

Large runs (`sample.num_samples` in the tens of thousands, many hosts) are written in shards:
every process saves only the rows its own devices computed, tagged with their global sample
index, to `<out>/shards/samples_p{process:03d}_b{batch:05d}.npz`; after a barrier process 0
streams them into `samples.npz` (`merge_shards`: at most one shard in memory), checking that
indices 0..N-1 each appear exactly once.
"""

from __future__ import annotations

import logging
import math
import zipfile
from typing import Any, Optional, Tuple

import jax
import numpy as np
import tqdm
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from diffusion_jax.training import restore
from diffusion_jax import images, objectives
from diffusion_jax.nn import backbones
from diffusion_jax.pipelines import sampler
from diffusion_jax.pipelines.sampler import sample_tag
from diffusion_jax.parallel import sharding
from diffusion_jax.parallel import policy
from diffusion_jax.sampling.class_labels import labels_for
from diffusion_jax.sampling.class_labels import parse_class_labels
from diffusion_jax.config.errors import ConfigError
from diffusion_jax.modes.validation import validate_config
from diffusion_jax.parallel.multihost import local_rows

SHARD_PATTERN = 'samples_p*_b*.npz'
FRAME_MS, LAST_FRAME_MS = 100, 1500  # Display times of the animation's frames.


def shard_path(shard_dir: epath.Path, process: int, batch: int) -> epath.Path:
  """Where `process` writes its rows of sampling batch `batch`."""
  return shard_dir / f'samples_p{process:03d}_b{batch:05d}.npz'


def write_shard(path: epath.Path, indices: np.ndarray, images_uint8: np.ndarray,
                labels: Optional[np.ndarray]) -> None:
  """Saves one shard: 'index' (global sample ids), 'image' (uint8 NHWC), 'label' if given."""
  arrays = {'index': np.asarray(indices, np.int64), 'image': images_uint8}
  if labels is not None:
    arrays['label'] = np.asarray(labels, np.int32)
  with path.open('wb') as f:
    np.savez(f, **arrays)


def _member_header(archive: zipfile.ZipFile, name: str) -> Tuple[Tuple[int, ...], np.dtype]:
  """(shape, dtype) of the .npy member `name` of an open npz, from its header alone."""
  with archive.open(f'{name}.npy') as member:
    version = np.lib.format.read_magic(member)
    read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                   else np.lib.format.read_array_header_2_0)
    shape, fortran_order, dtype = read_header(member)
  if fortran_order:
    raise RuntimeError(f'{name}.npy is Fortran-ordered; shards are written C-ordered.')
  return shape, dtype


def _read_shard_member(path: epath.Path, name: str) -> np.ndarray:
  """One array of a shard npz (np.load reads only that member)."""
  with path.open('rb') as f:
    with np.load(f) as shard:
      return shard[name]


def merge_shards(shard_dir: epath.Path, out_path: epath.Path, num_samples: int,
                 conditional: bool, head: int = 0) -> Tuple[np.ndarray, Optional[np.ndarray]]:
  """Writes the shards of `shard_dir` in sample-index order as `out_path`, an npz with `arr_0`
  (uint8 [N, H, W, C]) and, when `conditional`, `arr_1` (int32 labels [N]), as np.savez writes
  them (guided-diffusion's evaluator reads it); returns (images of samples 0..head-1, the
  labels [N] or None).

  Streamed, so process 0 never holds all N images (~10 GB for 50k at 256^2): a first pass reads
  only the shards' indices (and labels) and raises RuntimeError unless they hold each index
  0..num_samples-1 exactly once, before anything is written; the second writes arr_0's .npy
  member into the zip run by run of consecutive indices from one shard, holding at most one
  shard's images. A shard is read once per run it holds: once when, as `generate` writes
  them, its indices are one contiguous range. The file is written next to `out_path` and
  renamed into place.
  """
  paths = sorted(shard_dir.glob(SHARD_PATTERN))
  seen = np.zeros((num_samples,), np.int64)
  owner = np.full((num_samples,), -1, np.int64)  # Which shard holds sample i, and which row.
  row_of = np.zeros((num_samples,), np.int64)
  labels = np.zeros((num_samples,), np.int32) if conditional else None
  image_shape = None
  for k, path in enumerate(paths):
    with path.open('rb') as f:
      with np.load(f) as shard:
        idx = shard['index']
        shape, dtype = _member_header(shard.zip, 'image')
        if conditional:
          if 'label' not in shard.files:
            raise RuntimeError(f'{path} has no labels, but the model is class-conditional.')
          shard_labels = shard['label']
    if idx.size and (idx.min() < 0 or idx.max() >= num_samples):
      raise RuntimeError(f'{path} holds sample indices outside [0, {num_samples}).')
    if dtype != np.uint8 or shape[0] != idx.size or (image_shape not in (None, shape[1:])):
      raise RuntimeError(f'{path} holds images {shape} {dtype} for {idx.size} indices; every '
                         f'shard must hold uint8 images of one shape ({image_shape}).')
    image_shape = shape[1:]
    np.add.at(seen, idx, 1)
    owner[idx], row_of[idx] = k, np.arange(idx.size)
    if conditional:
      labels[idx] = shard_labels
  if image_shape is None or np.any(seen != 1):
    missing, repeated = int(np.sum(seen == 0)), int(np.sum(seen > 1))
    raise RuntimeError(f'The shards in {shard_dir} do not hold samples 0..{num_samples - 1} '
                       f'exactly once: {missing} missing, {repeated} repeated. (With several '
                       'hosts the workdir must be one file system they share, e.g. gs://.)')

  first = np.zeros((min(head, num_samples),) + tuple(image_shape), np.uint8)
  starts = np.flatnonzero(np.diff(owner, prepend=-1))  # Runs of samples from one shard.
  ends = np.append(starts[1:], num_samples)
  tmp = out_path.parent / (out_path.name + '.tmp')
  with tmp.open('wb') as f:
    with zipfile.ZipFile(f, 'w', zipfile.ZIP_STORED, allowZip64=True) as archive:
      with archive.open('arr_0.npy', 'w', force_zip64=True) as member:
        np.lib.format.write_array_header_1_0(member, {
            'descr': np.lib.format.dtype_to_descr(np.dtype(np.uint8)), 'fortran_order': False,
            'shape': (num_samples,) + tuple(image_shape)})
        loaded, images_k = -1, None
        for start, end in zip(starts, ends):
          if owner[start] != loaded:
            images_k = None  # The last shard's images go before the next shard's are read.
            loaded = int(owner[start])
            images_k = _read_shard_member(paths[loaded], 'image')
          rows = row_of[start:end]
          run = (images_k[rows[0]:rows[-1] + 1] if np.all(np.diff(rows) == 1)
                 else images_k[rows])
          member.write(np.ascontiguousarray(run).reshape(-1).data)
          if start < len(first):
            first[start:min(end, len(first))] = run[:len(first) - start]
        del images_k
      if conditional:
        with archive.open('arr_1.npy', 'w', force_zip64=True) as member:
          np.lib.format.write_array(member, labels)
  tmp.replace(out_path)  # An earlier samples.npz of this tag is overwritten.
  return first, labels


def _grid_upscale(config) -> int:
  return max(1, 64 // config.data.resolution)


def _grid_columns(config) -> int:
  """One column per class when sampling cycles through 4..16 classes, else 0 (square)."""
  num_classes = config.model.num_classes
  if not 4 <= num_classes <= 16:
    return 0
  cycling = parse_class_labels(config.sample.class_labels, num_classes) is None
  return num_classes if cycling else 0


def write_animation(path: epath.Path, trajectory: Any, config) -> int:
  """Writes an animated GIF: per recorded step, x_t beside the predicted x0; returns #frames.

  `trajectory` holds x_t (the sample after each recorded step, so the last one is the output)
  and x0 [K, n, H, W, C] in [-1, 1]. A bar under each frame shows the progress; the last frame
  stays up longer.
  """
  x_t, x0 = np.asarray(trajectory.x_t), np.asarray(trajectory.x0)
  num_frames, upscale = x_t.shape[0], _grid_upscale(config)
  ncols = min(_grid_columns(config), x_t.shape[1])
  frames = [images.animation_frame(images.to_uint8(x_t[k]), images.to_uint8(x0[k]),
                                   (k + 1) / num_frames, ncols=ncols, upscale=upscale)
            for k in range(num_frames)]
  images.write_gif(str(path), frames, [FRAME_MS] * (num_frames - 1) + [LAST_FRAME_MS])
  return num_frames


def generate(config, workdir: str, mesh: Optional[Mesh] = None) -> epath.Path:
  """`--mode=sample`: writes `sample.num_samples` images from the newest checkpoint.

  Output in `<workdir>/samples/<tag>/`: `samples.npz`, `grid.png` (captioned with step,
  sampler and steps), `shards/` (each process's rows, see the module docstring) and, with
  `sample.animation`, `animation.gif` of the first batch. Labels cycle through
  `sample.class_labels` (all classes when empty) by sample index. Returns that folder.
  """
  validate_config(config, mode='sample')
  mesh = mesh or sharding.create_mesh(config.mesh)
  scfg = config.sample
  classifier = restore.restore_guidance_classifier(config, mesh)
  num_classes = sampler.label_classes(config, classifier)
  conditional = num_classes > 0
  try:
    class_labels = parse_class_labels(scfg.class_labels, num_classes)
  except ValueError as e:
    raise ConfigError(str(e)) from e
  params, step = restore.restore_params(config, workdir, mesh, scfg.use_ema, scfg.ema)
  model = backbones.create_model(config.model, config.data.channels)
  batch_size, num_samples = scfg.batch_size, scfg.num_samples
  sample_fn = sampler.make_sample_fn(model, config, mesh, batch_size, classifier=classifier)
  animation = bool(scfg.animation)
  if animation:
    animate_fn = sampler.make_sample_fn(model, config, mesh, batch_size,
                                trajectory_every=scfg.animation_every,
                                trajectory_images=scfg.animation_num_images,
                                classifier=classifier)

  out_dir = epath.Path(workdir) / 'samples' / sample_tag(config, step)
  shard_dir = out_dir / 'shards'
  process = jax.process_index()
  if process == 0:  # Shards of an earlier run (maybe with other hosts) must not be merged.
    if shard_dir.exists():
      shard_dir.rmtree()
    shard_dir.mkdir(parents=True, exist_ok=True)
  multihost_utils.sync_global_devices('sampling: shard folder ready')

  def save_local_rows(b: int, x: jax.Array, indices: np.ndarray, labels: np.ndarray) -> None:
    rows, values = local_rows(x)
    keep = indices[rows] < num_samples  # The last batch may run past num_samples.
    if np.any(keep):
      rows = rows[keep]
      write_shard(shard_path(shard_dir, process, b), indices[rows],
                  images.to_uint8(values[keep]), labels[rows] if conditional else None)

  num_batches = math.ceil(num_samples / batch_size)
  rng = jax.random.PRNGKey(scfg.seed)
  progress = tqdm.trange(num_batches, desc=f'sampling ({scfg.sampler})', unit='batch',
                         disable=process != 0)
  pending = None  # Batch b is written while batch b + 1 computes (dispatch is asynchronous).
  for b in progress:
    indices = b * batch_size + np.arange(batch_size)
    labels = labels_for(indices, class_labels, num_classes)
    key = jax.random.fold_in(rng, b)
    if pending is not None:
      policy.finish_before_next_program(mesh, pending[1])
    if animation and b == 0:
      x, trajectory = animate_fn(params, key, labels)
      if process == 0:
        frames = write_animation(out_dir / 'animation.gif', trajectory, config)
        logging.info('Wrote animation.gif (%d frames)', frames)
    else:
      x = sample_fn(params, key, labels)
    if pending is not None:
      save_local_rows(*pending)
    pending = (b, x, indices, labels)
  save_local_rows(*pending)
  multihost_utils.sync_global_devices('sampling: shards written')

  if process == 0:
    ncols = _grid_columns(config)
    num_grid = min(num_samples, ncols * ncols if ncols else 256)
    grid, _ = merge_shards(shard_dir, out_dir / 'samples.npz', num_samples, conditional,
                           head=num_grid)
    steps = objectives.get(config.diffusion.objective).sampling_steps(config)
    label = images.grid_label(step, scfg.sampler, steps,
                              ema=(scfg.ema or True) if scfg.use_ema else False,
                              guidance_scale=(scfg.guidance_scale if config.model.num_classes > 0
                                              else None),
                              classifier_scale=scfg.classifier_scale)
    images.write_png(str(out_dir / 'grid.png'),
                     images.make_grid(grid, ncols=ncols, upscale=_grid_upscale(config),
                                      label=label))
    logging.info('Wrote %d samples of step %d to %s', num_samples, step, out_dir)
  multihost_utils.sync_global_devices('sampling done')
  return out_dir
