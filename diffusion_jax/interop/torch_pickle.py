"""Reads PyTorch weight files without torch: `.pth` state dicts and TorchScript archives.

Both are zip files: a pickle (`<root>/data.pkl`) whose tensors are persistent ids pointing at raw
storages `<root>/data/<key>`. Files of the legacy format (PyTorch < 1.6, or
`_use_new_zipfile_serialization=False`, such as pytorch-fid's Inception) are a sequence of
pickles followed by the raw storages. Every pickle is read with a restricted `pickle.Unpickler`
that only resolves the globals needed to rebuild tensors and containers (`torch._utils._rebuild_tensor_v2`,
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
from typing import Any, Callable, Dict, Mapping, Tuple

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
  """Unpickler that resolves only the tensor-rebuild globals; storages come from `read_storage`.

  `read_storage(key, storage_type, numel)` returns the storage's elements as a 1-D numpy array
  (from the zip archive, or from the legacy file's storage section).
  """

  def __init__(self, file, read_storage: Callable[[str, StorageType, int], np.ndarray]):
    super().__init__(file)
    self._read_storage = read_storage
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
    """('storage', type, key, location, numel[, view_metadata]): zip archives have 5 fields,
    the legacy format a sixth, (view_key, offset, size) for a view into the storage or None."""
    if not isinstance(pid, tuple) or len(pid) < 5 or pid[0] not in ('storage', b'storage'):
      raise UnsafePickleError(f'Unknown persistent id {pid!r} in the pickle (expected a storage).')
    storage_type, key, numel = pid[1], str(pid[2]), int(pid[4])
    if not isinstance(storage_type, StorageType):
      raise UnsafePickleError(f'Storage {key} has type {storage_type!r}, not a torch storage.')
    if key not in self._storages:
      self._storages[key] = self._read_storage(key, storage_type, numel)
    storage = self._storages[key]
    view = pid[5] if len(pid) > 5 else None
    if view is not None:
      _, offset, size = view
      storage = storage[int(offset):int(offset) + int(size)]
    return storage


def _decode_storage(raw: bytes, storage_type: StorageType) -> np.ndarray:
  """Little-endian storage bytes as a 1-D array of the storage's dtype (bfloat16 -> float32)."""
  if storage_type.dtype is None:  # bfloat16
    return _bfloat16_to_float32(np.frombuffer(raw, np.dtype('<u2')))
  return np.frombuffer(raw, np.dtype(storage_type.dtype).newbyteorder('<'))


def sha256(path: str) -> str:
  """Hex sha256 of a local or remote (gs://) file."""
  digest = hashlib.sha256()
  with epath.Path(path).open('rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      digest.update(chunk)
  return digest.hexdigest()


# The legacy (PyTorch < 1.6, `_use_new_zipfile_serialization=False`) format: pickles of this
# magic number, the protocol version and a sys-info dict, then the object's pickle, then the
# pickled list of storage keys, then each storage as int64 element count + raw bytes.
LEGACY_MAGIC = 0x1950a86a20f9469cfc6c
LEGACY_PROTOCOL = 1001


def _load_legacy(path: str, data: bytes) -> Any:
  """The object of a legacy-format torch.save file.

  Its storages follow the object's pickle, so the pickle is read twice: once with zero-filled
  stand-in storages to find where it ends and which storages it uses, then, with the storages
  read, for real. Every pickle goes through the restricted unpickler.
  """
  def header(f):
    return _RestrictedUnpickler(f, _no_storage).load()

  f = io.BytesIO(data)
  try:
    magic = header(f)
  except (pickle.UnpicklingError, EOFError, ValueError) as e:
    if isinstance(e, UnsafePickleError):
      raise
    raise ValueError(f'{path} is neither a zip archive nor a legacy torch.save file.') from e
  if magic != LEGACY_MAGIC:
    raise ValueError(f'{path} is neither a zip archive nor a legacy torch.save file '
                     '(wrong magic number).')
  protocol = header(f)
  if protocol != LEGACY_PROTOCOL:
    raise ValueError(f'{path}: legacy torch.save protocol {protocol} is not supported.')
  header(f)  # sys_info: endianness and type sizes (little-endian assumed, as torch writes).
  start = f.tell()
  types: Dict[str, Tuple[StorageType, int]] = {}

  def stand_in(key: str, storage_type: StorageType, numel: int) -> np.ndarray:
    types[key] = (storage_type, numel)
    return np.zeros((numel,), np.float32 if storage_type.dtype is None else storage_type.dtype)

  _RestrictedUnpickler(f, stand_in).load()
  end = f.tell()
  keys = header(f)
  if not isinstance(keys, list):
    raise ValueError(f'{path}: the legacy storage key list is missing; the file is corrupt.')
  storages: Dict[str, np.ndarray] = {}
  for key in keys:
    key = str(key)
    if key not in types:
      raise ValueError(f'{path}: storage {key} is listed but not used; the file is corrupt.')
    storage_type, numel = types[key]
    itemsize = 2 if storage_type.dtype is None else np.dtype(storage_type.dtype).itemsize
    count = np.frombuffer(f.read(8), '<i8')
    if count.size != 1 or int(count[0]) != numel:
      raise ValueError(f'{path}: storage {key} has a bad size header; the file is corrupt.')
    raw = f.read(numel * itemsize)
    if len(raw) != numel * itemsize:
      raise ValueError(f'{path}: storage {key} is truncated; the file is corrupt.')
    storages[key] = _decode_storage(raw, storage_type)
  missing = sorted(set(types) - set(storages))
  if missing:
    raise ValueError(f'{path}: storages {missing[:5]} are missing; the file is corrupt.')
  return _RestrictedUnpickler(io.BytesIO(data[start:end]),
                              lambda key, *_: storages[key]).load()


def _no_storage(key: str, *unused) -> np.ndarray:
  raise UnsafePickleError(f'Unexpected storage {key} in a header pickle.')


def load_pickle_archive(path: str, pickle_name: str = 'data.pkl') -> Any:
  """The object pickled in a PyTorch file: a zip archive (`.pth` state dict or TorchScript
  `.pt`, PyTorch >= 1.6) or the legacy non-zip torch.save format (e.g. pytorch-fid's
  `pt_inception-2015-12-05-6726825d.pth`)."""
  data = epath.Path(path).read_bytes()
  if not zipfile.is_zipfile(io.BytesIO(data)):
    return _load_legacy(path, data)
  with zipfile.ZipFile(io.BytesIO(data)) as archive:
    candidates = [n for n in archive.namelist() if n.endswith('/' + pickle_name)
                  and n.count('/') == 1]
    if not candidates:
      raise ValueError(f'{path} has no {pickle_name}: not a PyTorch archive.')
    root = candidates[0].split('/')[0]

    def read_storage(key: str, storage_type: StorageType, numel: int) -> np.ndarray:
      del numel
      return _decode_storage(archive.read(f'{root}/data/{key}'), storage_type)

    with archive.open(candidates[0]) as f:
      return _RestrictedUnpickler(io.BytesIO(f.read()), read_storage).load()


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
