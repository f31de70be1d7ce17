"""Reads PyTorch weight files without torch: `.pth` state dicts and TorchScript archives.

Both are zip files: a pickle (`<root>/data.pkl`) whose tensors are persistent ids pointing at raw
storages `<root>/data/<key>`. Files of the legacy format (PyTorch < 1.6, or
`_use_new_zipfile_serialization=False`, such as pytorch-fid's Inception) are a sequence of
pickles followed by the raw storages. Every pickle is read with a restricted `pickle.Unpickler`
that only resolves the globals needed to rebuild tensors and containers
(`torch._utils._rebuild_tensor_v2`, the `torch.*Storage` types, `collections.OrderedDict`, ...).
TorchScript module objects (`__torch__.*` classes) are data records in the archive, not Python
code, and become plain `ScriptModule` records of their attributes. Any other global (e.g.
`os.system`) is refused with an `UnsafePickleError` naming it, before anything is called.

A weight file is untrusted input. Unpickling builds no array: each tensor is a `Tensor` record
(storage key and dtype, offset, shape, strides). `open_state_dict` then checks every record
against its storage, naming the tensor, before any byte of the storage is viewed: offset and
strides non-negative, offset + extent inside the storage, the element count no more than the
storage holds (a 4 TiB shape with zero strides over a 1 KiB storage is refused), and the
storage's bytes present in the file at the size its header claims. Only `Tensor.numpy()` reads
and copies the bytes, so an importer checks each tensor's shape before it materialises it.
Containers (dicts, lists, tuples, TorchScript modules) flatten to dotted names ('a.b.0.weight');
numbers, strings and None are not tensors and are left out; anything else is refused by name.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import io
import math
import pickle
import struct
import zipfile
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

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
# The pickle of a weight file holds names and tensor records only (the bytes are in storages):
# a larger one is refused before it is decompressed.
MAX_PICKLE_BYTES = 1 << 28
# Containers nested deeper than this are refused (a state dict is a few levels deep).
MAX_DEPTH = 64


class UnsafePickleError(pickle.UnpicklingError):
  """The pickle references a global that is not needed to rebuild tensors."""


class CorruptFileError(ValueError):
  """The file is truncated or contradicts itself (a tensor outside its storage, a storage
  shorter than its header says, ...); the message names the file and the tensor."""


@dataclasses.dataclass(frozen=True)
class StorageType:
  """A `torch.*Storage` class (or `torch.float32`-style dtype) named in the pickle."""
  name: str
  dtype: Any  # numpy dtype; None for bfloat16 (decoded by hand).

  @property
  def itemsize(self) -> int:
    return 2 if self.dtype is None else np.dtype(self.dtype).itemsize

  @property
  def dtype_name(self) -> str:
    """The torch element type: 'float32', 'bfloat16', 'int64', ..."""
    return 'bfloat16' if self.dtype is None else np.dtype(self.dtype).name


@dataclasses.dataclass(frozen=True)
class StorageRef:
  """A persistent id of the pickle, as written (checked later, by the tensor that uses it):
  storage `key` of `storage_type` with `numel` elements; legacy files may add a view
  (view_offset, view_size) into that storage."""
  storage_type: Any
  key: str
  numel: Any
  view: Any = None


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


class _Storages:
  """Where a file's storages are: `size(key)` (bytes present, None if absent, or a string
  saying why they cannot be read) and `read(key)` (those bytes)."""

  def __init__(self, size: Callable[[str], Any], read: Callable[[str], bytes]):
    self.size, self._read = size, read
    self._cache: Dict[str, bytes] = {}

  def read(self, key: str) -> bytes:
    if key not in self._cache:
      self._cache[key] = self._read(key)
    return self._cache[key]


@dataclasses.dataclass
class Tensor:
  """A tensor of a weight file, not yet read: `shape`, `dtype_name` and `numpy()`.

  Made by the unpickler from `_rebuild_tensor_v2`'s arguments as written; `open_state_dict`
  checks them (`check`) before anything can call `numpy()`.
  """
  storage: Any
  offset: Any
  size: Any
  stride: Any
  storages: _Storages
  checked: bool = False

  @property
  def shape(self) -> Tuple[int, ...]:
    return tuple(int(s) for s in self.size)

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def dtype_name(self) -> str:
    """The element type stored in the file ('float32', 'bfloat16', 'int64', ...)."""
    return self.storage.storage_type.dtype_name

  @property
  def dtype(self) -> np.dtype:
    """The numpy dtype `numpy()` returns (bfloat16 is widened to float32)."""
    dtype = self.storage.storage_type.dtype
    return np.dtype(np.float32 if dtype is None else dtype)

  def check(self, name: str, where: str) -> None:
    """Raises CorruptFileError naming `name` unless the record fits its storage (see the module
    docstring); reads no storage bytes."""
    def fail(problem):
      raise CorruptFileError(f'{where}: tensor {name!r} {problem}; the file is corrupt or was '
                             'crafted, and is not read.')
    ref = self.storage
    if not isinstance(ref, StorageRef):
      fail(f'has storage {type(ref).__name__}, not a storage record of the file')
    if not isinstance(ref.storage_type, StorageType):
      fail(f'has storage type {ref.storage_type!r}, not a torch storage type')
    if not _is_int(ref.numel) or ref.numel < 0:
      fail(f'has storage {ref.key!r} of {ref.numel!r} elements, not a count')
    if not isinstance(self.size, (tuple, list)) or not all(_is_int(s) for s in self.size):
      fail(f'has shape {self.size!r}, not a tuple of integers')
    if not isinstance(self.stride, (tuple, list)) or not all(_is_int(s) for s in self.stride):
      fail(f'has strides {self.stride!r}, not a tuple of integers')
    shape, stride, offset = tuple(self.size), tuple(self.stride), self.offset
    if len(shape) != len(stride):
      fail(f'has shape {shape} but {len(stride)} strides {stride}')
    if any(s < 0 for s in shape):
      fail(f'has shape {shape} with a negative size')
    if any(s < 0 for s in stride):
      fail(f'has strides {stride} with a negative stride')
    if not _is_int(offset) or offset < 0:
      fail(f'has storage offset {offset!r}, not a non-negative integer')
    itemsize = ref.storage_type.itemsize
    present = self.storages.size(ref.key)
    if isinstance(present, str):
      fail(f'has storage {ref.key!r} that {present}')
    if present is None:
      fail(f'has storage {ref.key!r}, which is missing from the file (truncated?)')
    if present != ref.numel * itemsize:
      fail(f'has storage {ref.key!r} of {present} bytes in the file, but its header says '
           f'{ref.numel} {ref.storage_type.dtype_name} elements ({ref.numel * itemsize} bytes)')
    available = ref.numel
    if ref.view is not None:  # Legacy files: (view key, offset, size) into the storage.
      view = ref.view
      if (not isinstance(view, tuple) or len(view) != 3 or not _is_int(view[1])
          or not _is_int(view[2]) or view[1] < 0 or view[2] < 0
          or view[1] + view[2] > ref.numel):
        fail(f'has a storage view {view!r} outside storage {ref.key!r} of {ref.numel} elements')
      available = view[2]
    numel = math.prod(shape)
    if numel == 0:
      if offset > available:
        fail(f'starts at offset {offset}, past its storage of {available} elements')
    else:
      extent = offset + sum((n - 1) * s for n, s in zip(shape, stride)) + 1
      if extent > available:
        fail(f'of shape {shape}, strides {stride} at offset {offset} reaches element '
             f'{extent - 1} of a storage of {available} elements')
      if numel > available:
        fail(f'of shape {shape} has {numel} elements, more than its storage of {available} '
             'holds')
    self.checked = True

  def numpy(self) -> np.ndarray:
    """The tensor's values, copied out of the storage (only after `check`)."""
    if not self.checked:
      raise RuntimeError('Tensor.numpy() before Tensor.check(): records of a file are read only '
                         'after they are checked (open_state_dict does both).')
    ref, shape = self.storage, self.shape
    view_offset = ref.view[1] if ref.view is not None else 0
    raw = self.storages.read(ref.key)
    storage_type = ref.storage_type
    count = ref.numel
    if storage_type.dtype is None:  # bfloat16
      storage = _bfloat16_to_float32(np.frombuffer(raw, np.dtype('<u2'), count))
    else:
      storage = np.frombuffer(raw, np.dtype(storage_type.dtype).newbyteorder('<'), count)
    start = view_offset + int(self.offset)
    if math.prod(shape) == 0:
      return np.zeros(shape, storage.dtype.newbyteorder('='))
    # Sizes 0 and 1 never step, so their strides (which may be anything) are not used.
    strides = tuple(int(s) * storage.itemsize if n > 1 else 0
                    for n, s in zip(shape, self.stride))
    view = np.lib.stride_tricks.as_strided(storage[start:], shape=shape, strides=strides,
                                           writeable=False)
    return np.array(view, dtype=storage.dtype.newbyteorder('='))

  def __array__(self, dtype=None, copy=None):
    del copy
    out = self.numpy()
    return out if dtype is None else out.astype(dtype)


def _is_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _rebuild_tensor(storages: _Storages, storage: Any, offset: Any = None, size: Any = None,
                    stride: Any = None, *unused) -> Tensor:
  """`torch._utils._rebuild_tensor_v2`: a `Tensor` record of the arguments as written, to be
  read from the file's `storages`."""
  del unused
  return Tensor(storage, offset, size, stride, storages)


def _build_intlist(values):
  return list(values)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *unused):
  del requires_grad, backward_hooks, unused
  return data


REBUILD_TENSOR = (('torch._utils', '_rebuild_tensor_v2'), ('torch._utils', '_rebuild_tensor'))
ALLOWED_GLOBALS = {
    ('torch._utils', '_rebuild_parameter'): _rebuild_parameter,
    ('torch.jit._pickle', 'build_intlist'): _build_intlist,
    ('collections', 'OrderedDict'): collections.OrderedDict,
}


class _RestrictedUnpickler(pickle.Unpickler):
  """Unpickler that resolves only the tensor-rebuild globals; a persistent id becomes a
  `StorageRef` (nothing is read), noted in `refs`, and a tensor a `Tensor` record whose bytes
  are in `storages` (None: the pickle may hold no tensor)."""

  def __init__(self, file, storages: Optional[_Storages] = None):
    super().__init__(file)
    self._storages = storages
    self.refs: List[StorageRef] = []

  def find_class(self, module: str, name: str):
    if (module, name) in REBUILD_TENSOR and self._storages is not None:
      return functools.partial(_rebuild_tensor, self._storages)
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
    if self._storages is None:
      raise UnsafePickleError(f'Unexpected storage {pid[2]!r} in a header pickle.')
    ref = StorageRef(pid[1], str(pid[2]), pid[4], pid[5] if len(pid) > 5 else None)
    self.refs.append(ref)
    return ref


# What a malformed pickle raises while it is read (besides UnsafePickleError).
_PICKLE_ERRORS = (pickle.UnpicklingError, EOFError, TypeError, ValueError, AttributeError,
                  IndexError, KeyError, struct.error, OverflowError, UnicodeDecodeError,
                  RecursionError, ImportError)


def _unpickle(f: io.BytesIO, path: str, what: str, storages: Optional[_Storages] = None
              ) -> Tuple[Any, _RestrictedUnpickler]:
  """(object, unpickler) of the pickle at `f`'s position (which moves past it), its tensors read
  from `storages` (None: a pickle without tensors); a malformed pickle is a CorruptFileError
  naming `path` and `what`."""
  unpickler = _RestrictedUnpickler(f, storages)
  try:
    obj = unpickler.load()
  except UnsafePickleError:
    raise
  except _PICKLE_ERRORS as e:
    raise CorruptFileError(f'{path}: {what} is not a readable pickle ({type(e).__name__}: '
                           f'{e}); the file is truncated or not a PyTorch file.') from None
  return obj, unpickler


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
  """The object of a legacy-format torch.save file, its tensors bound to the storages that
  follow the pickles (located, not read; a storage whose header or bytes are wrong is noted and
  named by the tensor that uses it)."""
  f = io.BytesIO(data)

  def header(what):
    try:
      return _unpickle(f, path, what)[0]
    except CorruptFileError:
      raise CorruptFileError(f'{path} is neither a zip archive nor a legacy torch.save file.'
                             ) from None

  magic = header('the legacy magic number')
  if magic != LEGACY_MAGIC:
    raise CorruptFileError(f'{path} is neither a zip archive nor a legacy torch.save file '
                           '(wrong magic number).')
  protocol = header('the legacy protocol version')
  if protocol != LEGACY_PROTOCOL:
    raise CorruptFileError(f'{path}: legacy torch.save protocol {protocol!r} is not supported.')
  header('the legacy sys_info')  # Endianness and type sizes (little-endian, as torch writes).
  located: Dict[str, Any] = {}  # key -> (start, nbytes), or why it cannot be read.

  def size(key):
    where = located.get(key)
    return where if where is None or isinstance(where, str) else where[1]

  def read(key):
    start, nbytes = located[key]
    return data[start:start + nbytes]

  obj, unpickler = _unpickle(f, path, "the legacy file's object pickle", _Storages(size, read))
  keys, _ = _unpickle(f, path, 'the legacy storage key list')
  pos = f.tell()
  if not isinstance(keys, list):
    raise CorruptFileError(f'{path}: the legacy storage key list is missing; the file is corrupt.')
  itemsizes: Dict[str, int] = {}
  for ref in unpickler.refs:
    if isinstance(ref.storage_type, StorageType):
      itemsizes.setdefault(ref.key, ref.storage_type.itemsize)
  broken = None
  for key in keys:
    key = str(key)
    if broken is not None:
      located[key] = 'comes after a damaged storage (truncated file)'
      continue
    if key not in itemsizes:
      raise CorruptFileError(f'{path}: storage {key!r} is listed but no tensor uses it; the file '
                             'is corrupt.')
    count = np.frombuffer(data[pos:pos + 8], '<i8')
    if count.size != 1 or int(count[0]) < 0:
      broken = located[key] = 'has no size header (truncated file)'
      continue
    nbytes = int(count[0]) * itemsizes[key]
    if pos + 8 + nbytes > len(data):
      broken = located[key] = (f'is cut short: {len(data) - pos - 8} of its {nbytes} bytes are '
                               'in the file (truncated)')
      continue
    located[key] = (pos + 8, nbytes)
    pos += 8 + nbytes
  if broken is None and pos != len(data):  # torch writes nothing after the last storage.
    raise CorruptFileError(f'{path}: {len(data) - pos} bytes follow the last storage; the '
                           'storages do not add up to the file (a wrong storage type or a '
                           'corrupt file).')
  return obj


def _load_zip(path: str, data: bytes) -> Any:
  """The object of a zip archive (torch.save >= 1.6, TorchScript), its tensors bound to the
  archive's `<root>/data/<key>` entries (sized from the directory, not read)."""
  try:
    archive = zipfile.ZipFile(io.BytesIO(data))
    names = archive.namelist()
  except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
    raise CorruptFileError(f'{path} is a damaged zip archive ({e}); it is truncated or '
                           'corrupt.') from None
  candidates = [n for n in names if n.endswith('/data.pkl') and n.count('/') == 1]
  if not candidates:
    raise CorruptFileError(f'{path} has no <root>/data.pkl: not a PyTorch archive.')
  root = candidates[0].split('/')[0]
  info = archive.getinfo(candidates[0])
  if info.file_size > MAX_PICKLE_BYTES:
    raise CorruptFileError(f'{path}: {candidates[0]} claims {info.file_size} bytes, more than a '
                           f'weight file\'s pickle holds ({MAX_PICKLE_BYTES}); not read.')
  try:
    pickle_bytes = archive.read(candidates[0])
  except (zipfile.BadZipFile, ValueError, OSError, EOFError, zipfile.LargeZipFile) as e:
    raise CorruptFileError(f'{path}: {candidates[0]} cannot be read from the archive ({e}); '
                           'the file is truncated or corrupt.') from None
  entries = {n: archive.getinfo(n) for n in names}

  def size(key):
    entry = entries.get(f'{root}/data/{key}')
    return None if entry is None else entry.file_size

  def read(key):
    try:
      return archive.read(f'{root}/data/{key}')
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
      raise CorruptFileError(f'{path}: storage {key!r} cannot be read from the archive ({e}); '
                             'the file is truncated or corrupt.') from None

  obj, _ = _unpickle(io.BytesIO(pickle_bytes), path, candidates[0], _Storages(size, read))
  return obj


def load_pickle_archive(path: str) -> Any:
  """The object pickled in a PyTorch file, its tensors as unchecked `Tensor` records: a zip
  archive (`.pth` state dict or TorchScript `.pt`, PyTorch >= 1.6) or the legacy non-zip
  torch.save format (e.g. pytorch-fid's `pt_inception-2015-12-05-6726825d.pth`)."""
  data = epath.Path(path).read_bytes()
  if data[:4] == b'PK\x03\x04' or zipfile.is_zipfile(io.BytesIO(data)):
    return _load_zip(path, data)
  return _load_legacy(path, data)


# Leaves of a weight file's object that are not tensors: kept out of the state dict.
_NON_TENSORS = (bool, int, float, complex, str, bytes, type(None))


def flatten(obj: Any, path: str) -> Dict[str, Tensor]:
  """{dotted name: Tensor} of every tensor in `obj`, each checked against its storage.

  Dicts and TorchScript modules give their keys, lists and tuples their indices ('blocks.0.w');
  numbers, strings and None are skipped; any other object, a container met twice (a cycle, or
  one shared container whose names could multiply without bound), nesting deeper than MAX_DEPTH
  or two tensors of one name is a CorruptFileError naming it.
  """
  out: Dict[str, Tensor] = {}
  stack: List[Tuple[str, Any, int]] = [('', obj, 0)]
  seen: Dict[int, str] = {}  # Containers already walked (id -> name), so none is walked twice.
  while stack:
    name, item, depth = stack.pop()
    label = name or "<the file's object>"
    if isinstance(item, Tensor):
      item.check(label, path)
      if name in out:
        raise CorruptFileError(f'{path}: two tensors are named {name!r}; not read.')
      out[name] = item
      continue
    if isinstance(item, _NON_TENSORS):
      continue
    if isinstance(item, ScriptModule):
      children = list(item.attributes.items())
    elif isinstance(item, Mapping):
      children = list(item.items())
    elif isinstance(item, (list, tuple)):
      children = list(enumerate(item))
    elif isinstance(item, StorageRef):
      raise CorruptFileError(f'{path}: entry {label!r} is a bare storage, not a tensor; not read.')
    else:
      raise CorruptFileError(f'{path}: entry {label!r} is a {type(item).__name__}, not a tensor '
                             'or a container of tensors; not read.')
    if id(item) in seen:  # A cycle, or one container under two names (unbounded expansion).
      first = seen[id(item)] or "<the file's object>"
      raise CorruptFileError(f'{path}: entry {label!r} is the container already read as '
                             f'{first!r}; not read.')
    seen[id(item)] = name
    if depth >= MAX_DEPTH:
      raise CorruptFileError(f'{path}: entry {label!r} is nested more than {MAX_DEPTH} deep; '
                             'not read.')
    for key, value in reversed(children):
      stack.append((f'{name}.{key}' if name else str(key), value, depth + 1))
  return out


def open_state_dict(path: str) -> Dict[str, Tensor]:
  """Every tensor of a `.pth` state dict or TorchScript archive by dotted name ('a.b.weight'),
  checked against its storage (module docstring) but not read: `Tensor.numpy()` reads one."""
  out = flatten(load_pickle_archive(path), path)
  if not out:
    raise CorruptFileError(f'{path} holds no tensors.')
  return out


def load_state_dict(path: str) -> Dict[str, np.ndarray]:
  """All tensors of a `.pth` state dict or TorchScript archive, by dotted name ('a.b.weight'),
  read into numpy arrays (bfloat16 as float32) after every one of them has been checked."""
  return {name: tensor.numpy() for name, tensor in open_state_dict(path).items()}
