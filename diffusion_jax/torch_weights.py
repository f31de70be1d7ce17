"""Reads PyTorch weight files without torch: `.pth` state dicts and TorchScript archives.

Both are zip files: a pickle (`<root>/data.pkl`) whose tensors are persistent ids pointing at raw
storages `<root>/data/<key>`. The pickle is read with a restricted `pickle.Unpickler` that only
resolves the globals needed to rebuild tensors and containers (`torch._utils._rebuild_tensor_v2`,
the `torch.*Storage` types, `collections.OrderedDict`, ...). TorchScript module objects
(`__torch__.*` classes) are data records in the archive, not Python code, and become plain
`ScriptModule` records of their attributes. Any other global (e.g. `os.system`) is refused with an
`UnsafePickleError` naming it, before anything is called.

Tensors are rebuilt with numpy from the storage bytes (dtype, storage offset, strides, shape).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import io
import pickle
import zipfile
from typing import Any, Dict, Mapping, Tuple

import numpy as np
from etils import epath

STORAGE_DTYPES = {
    'FloatStorage': np.float32, 'DoubleStorage': np.float64, 'HalfStorage': np.float16,
    'BFloat16Storage': None, 'LongStorage': np.int64, 'IntStorage': np.int32,
    'ShortStorage': np.int16, 'CharStorage': np.int8, 'ByteStorage': np.uint8,
    'BoolStorage': np.bool_,
}
SCALAR_DTYPES = {'float32': np.float32, 'float': np.float32, 'float64': np.float64,
                 'double': np.float64, 'float16': np.float16, 'half': np.float16,
                 'int64': np.int64, 'long': np.int64, 'int32': np.int32, 'int': np.int32,
                 'int16': np.int16, 'int8': np.int8, 'uint8': np.uint8, 'bool': np.bool_,
                 'bfloat16': None}


class UnsafePickleError(pickle.UnpicklingError):
  """The pickle references a global that is not needed to rebuild tensors."""


@dataclasses.dataclass(frozen=True)
class StorageType:
  """A `torch.*Storage` class (or `torch.float32`-style dtype) named in the pickle."""
  name: str
  dtype: Any  # numpy dtype; None for bfloat16 (decoded by hand).


class ScriptModule:
  """A TorchScript module object of the archive: its attributes (the class says its name).

  The unpickler makes one subclass per TorchScript class name (`type_name`), so that pickle's
  NEWOBJ gets a type; nothing of the archive's code is run or imported.
  """
  type_name = ''

  def __init__(self):
    self.attributes: Dict[str, Any] = {}

  def __setstate__(self, state):
    self.attributes = dict(state) if isinstance(state, Mapping) else {'__state__': state}


def _script_module_type(type_name: str) -> type:
  return type('ScriptModule', (ScriptModule,), {'type_name': type_name})


def _bfloat16_to_float32(raw: np.ndarray) -> np.ndarray:
  return (raw.astype(np.uint32) << 16).view(np.float32)


def _rebuild_tensor(storage: np.ndarray, offset: int, shape: Tuple[int, ...],
                    stride: Tuple[int, ...], *unused) -> np.ndarray:
  """`torch._utils._rebuild_tensor_v2` in numpy: a strided view of the storage, copied."""
  del unused
  shape, stride = tuple(int(s) for s in shape), tuple(int(s) for s in stride)
  if not shape:
    return np.array(storage[offset])
  if any(s == 0 for s in shape):
    return np.zeros(shape, storage.dtype)
  extent = offset + sum((n - 1) * s for n, s in zip(shape, stride)) + 1
  if extent > storage.size:
    raise ValueError(f'Tensor of shape {shape}, stride {stride} at offset {offset} runs past '
                     f'its storage of {storage.size} elements: the file is corrupt.')
  item = storage.itemsize
  view = np.lib.stride_tricks.as_strided(storage[offset:], shape=shape,
                                         strides=tuple(s * item for s in stride))
  return np.array(view)


def _build_intlist(values):
  return list(values)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *unused):
  del requires_grad, backward_hooks, unused
  return data


ALLOWED_GLOBALS = {
    ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor,
    ('torch._utils', '_rebuild_tensor'): _rebuild_tensor,
    ('torch._utils', '_rebuild_parameter'): _rebuild_parameter,
    ('torch.jit._pickle', 'build_intlist'): _build_intlist,
    ('collections', 'OrderedDict'): collections.OrderedDict,
}


class _RestrictedUnpickler(pickle.Unpickler):
  """Unpickler of one archive: resolves only the tensor-rebuild globals, storages from the zip."""

  def __init__(self, file, archive: zipfile.ZipFile, root: str):
    super().__init__(file)
    self._archive, self._root = archive, root
    self._storages: Dict[str, np.ndarray] = {}

  def find_class(self, module: str, name: str):
    if (module, name) in ALLOWED_GLOBALS:
      return ALLOWED_GLOBALS[(module, name)]
    if module == 'torch' and name in STORAGE_DTYPES:
      return StorageType(name, STORAGE_DTYPES[name])
    if module == 'torch' and name in SCALAR_DTYPES:
      return StorageType(name, SCALAR_DTYPES[name])
    if module == '__torch__' or module.startswith('__torch__.'):
      return _script_module_type(f'{module}.{name}')
    raise UnsafePickleError(
        f'Refusing to load {module}.{name}: the pickle references a global that is not a '
        'tensor, storage or container type. Only PyTorch weight files (state dicts, TorchScript '
        'archives) can be read; the file may be malicious or of another kind.')

  def persistent_load(self, pid):
    if not isinstance(pid, tuple) or not pid or pid[0] != 'storage':
      raise UnsafePickleError(f'Unknown persistent id {pid!r} in the pickle (expected a storage).')
    storage_type, key = pid[1], str(pid[2])
    if not isinstance(storage_type, StorageType):
      raise UnsafePickleError(f'Storage {key} has type {storage_type!r}, not a torch storage.')
    if key not in self._storages:
      raw = self._archive.read(f'{self._root}/data/{key}')
      if storage_type.dtype is None:  # bfloat16
        self._storages[key] = _bfloat16_to_float32(np.frombuffer(raw, np.uint16))
      else:
        self._storages[key] = np.frombuffer(raw, np.dtype(storage_type.dtype).newbyteorder('<'))
    return self._storages[key]


def sha256(path: str) -> str:
  """Hex sha256 of a local or remote (gs://) file."""
  digest = hashlib.sha256()
  with epath.Path(path).open('rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      digest.update(chunk)
  return digest.hexdigest()


def load_pickle_archive(path: str, pickle_name: str = 'data.pkl') -> Any:
  """The object pickled in a PyTorch zip archive (a `.pth` state dict or TorchScript `.pt`)."""
  data = epath.Path(path).read_bytes()
  if not zipfile.is_zipfile(io.BytesIO(data)):
    raise ValueError(f'{path} is not a zip archive: only PyTorch >= 1.6 files (torch.save with '
                     'the default zip format, or torch.jit.save) can be read without torch.')
  with zipfile.ZipFile(io.BytesIO(data)) as archive:
    candidates = [n for n in archive.namelist() if n.endswith('/' + pickle_name)
                  and n.count('/') == 1]
    if not candidates:
      raise ValueError(f'{path} has no {pickle_name}: not a PyTorch archive.')
    root = candidates[0].split('/')[0]
    with archive.open(candidates[0]) as f:
      return _RestrictedUnpickler(io.BytesIO(f.read()), archive, root).load()


def _flatten(obj: Any, prefix: str, out: Dict[str, np.ndarray]) -> None:
  if isinstance(obj, np.ndarray):
    out[prefix] = obj
  elif isinstance(obj, ScriptModule):
    for key, value in obj.attributes.items():
      _flatten(value, f'{prefix}.{key}' if prefix else key, out)
  elif isinstance(obj, Mapping):
    for key, value in obj.items():
      _flatten(value, f'{prefix}.{key}' if prefix else str(key), out)


def load_state_dict(path: str) -> Dict[str, np.ndarray]:
  """All tensors of a `.pth` state dict or TorchScript archive, by dotted name ('a.b.weight')."""
  out: Dict[str, np.ndarray] = {}
  _flatten(load_pickle_archive(path), '', out)
  if not out:
    raise ValueError(f'{path} holds no tensors.')
  return out
