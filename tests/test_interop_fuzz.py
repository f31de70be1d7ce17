"""Weight files are untrusted input: crafted files fed to every reader of them.

The files are written here with the standard library only (pickle opcodes + zipfile, no torch):
a complete model's state dict (the fixtures' own tensors) with one defect in one tensor, or a
damaged file. The readers: diffusers `.bin` (`python -m diffusion_jax.convert --from=diffusers`),
improved/guided-diffusion `.pt` (`--from=openai`) and the Inception weights
(evaluation/inception.py `load_inception`, as a `.pth` state dict, a TorchScript archive and a
legacy torch.save file). Each defect must end in one line naming the tensor (or, for a file that
is not a whole archive or calls a foreign global, the file or the global), exit status 1 for the
command line, no traceback, nothing written, and no allocation of what the file claims (a 4 TiB
shape over a 1 KiB storage is refused, not allocated).
"""

import json
import os
import pathlib
import shutil
import struct
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from absl import flags
from safetensors import numpy as safetensors_numpy

from diffusion_jax.evaluation import inception
from diffusion_jax.interop import cli
from diffusion_jax.interop import torch_pickle

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = ROOT / 'tests' / 'fixtures'
DIFFUSERS = FIXTURES / 'diffusers' / 'attn_low_lpb1'
OPENAI = FIXTURES / 'openai' / 'guided_legacy_heads'
STORAGES = {np.dtype(np.float32): 'FloatStorage', np.dtype(np.float64): 'DoubleStorage',
            np.dtype(np.int64): 'LongStorage', np.dtype(np.float16): 'HalfStorage'}

# ------------------------------------------------------------------ writing torch files by hand


def _global(module, name):
  return b'c' + module.encode() + b'\n' + name.encode() + b'\n'


def _str(text):
  data = text.encode()
  return b'X' + struct.pack('<I', len(data)) + data


def _int(n):
  data = n.to_bytes((n.bit_length() + 8) // 8, 'little', signed=True) if n else b''
  return b'\x8a' + bytes([len(data)]) + data  # LONG1: any size, any sign.


def _tuple(items):
  return b'(' + b''.join(items) + b't'


def _ordered_dict(entries):
  return (_global('collections', 'OrderedDict') + b')R' + b'(' +
          b''.join(_str(k) + v for k, v in entries) + b'u')


def _tensor(record, legacy=False):
  """The pickle of `torch._utils._rebuild_tensor_v2(storage, offset, shape, stride, False, {})`
  with a persistent id ('storage', torch.<type>, key, 'cpu', numel), and in a legacy file a
  sixth field: the view (view key, offset, size) or None."""
  pid = [_str('storage'), record.get('type_pickle', _global('torch', record['storage_type'])),
         _str(record['key']), _str('cpu'), _int(record['numel'])]
  if 'view' in record:
    pid.append(_tuple([_str(record['view'][0]), _int(record['view'][1]),
                       _int(record['view'][2])]))
  elif legacy:
    pid.append(b'N')
  args = [_tuple(pid) + b'Q', _int(record['offset']), _tuple([_int(n) for n in record['shape']]),
          _tuple([_int(s) for s in record['stride']]), b'\x89', _ordered_dict([])]
  return _global('torch._utils', '_rebuild_tensor_v2') + _tuple(args) + b'R'


def records(state_dict):
  """{name: record} of a numpy state dict: a contiguous tensor on its own storage each."""
  out = {}
  for i, (name, value) in enumerate(state_dict.items()):
    value = np.ascontiguousarray(value)
    stride = [int(s // value.itemsize) for s in value.strides] if value.ndim else []
    out[name] = dict(key=str(i), storage_type=STORAGES[value.dtype], numel=value.size,
                     offset=0, shape=list(value.shape), stride=stride,
                     data=value.astype(value.dtype.newbyteorder('<')).tobytes())
  return out


def zip_file(path, recs, wrap=None):
  """A torch.save zip archive (or, with wrap='script', a TorchScript-style archive whose object
  is a __torch__ module holding the tensors as attributes) of `recs`."""
  entries = [(name, _tensor(r)) for name, r in recs.items()]
  if wrap == 'script':
    state = b'}(' + b''.join(_str(k) + v for k, v in entries) + b'u'
    obj = _global('__torch__', 'InceptionV3') + b')\x81' + state + b'b'
  else:
    obj = _ordered_dict(entries)
  with zipfile.ZipFile(path, 'w') as archive:
    archive.writestr('archive/data.pkl', b'\x80\x02' + obj + b'.')
    archive.writestr('archive/version', '3\n')
    for r in recs.values():
      if 'data' in r:
        archive.writestr(f'archive/data/{r["key"]}', r['data'])
  return path


def legacy_file(path, recs):
  """A legacy (non-zip) torch.save file of `recs`: header pickles, the object, the key list,
  then each storage as an int64 element count and its bytes."""
  header = (b'\x80\x02' + _int(torch_pickle.LEGACY_MAGIC) + b'.' + b'\x80\x02' +
            _int(torch_pickle.LEGACY_PROTOCOL) + b'.' + b'\x80\x02}.')
  obj = (b'\x80\x02' + _ordered_dict([(n, _tensor(r, legacy=True)) for n, r in recs.items()])
         + b'.')
  keys = b'\x80\x02(' + b''.join(_str(r['key']) for r in recs.values()) + b'l.'
  storages = b''.join(struct.pack('<q', r['numel']) + r.get('data', b'')
                      for r in recs.values())
  path.write_bytes(header + obj + keys + storages)
  return path


# ------------------------------------------------------------------ the defects

TiB = 1 << 40


def _defect(recs, name, case):
  """A copy of `recs` with `case` applied to tensor `name` (file-level cases: see `_write`)."""
  recs = {k: dict(v) for k, v in recs.items()}
  r = recs[name]
  n = len(r['shape'])
  if case == 'negative_stride':
    r['stride'] = [-s for s in r['stride']]
  elif case == 'negative_offset':
    r['offset'] = -4
  elif case == 'offset_past_storage':
    r['offset'] = r['numel']
  elif case == 'overflowing_offset':
    r['offset'] = 1 << 64
  elif case == 'overflowing_stride':
    r['shape'], r['stride'] = [2] + r['shape'][1:], [1 << 62] + r['stride'][1:]
  elif case == 'huge_shape_zero_strides':  # 4 TiB of float32 from a 1 KiB storage.
    r['shape'], r['stride'] = [1024, 1024, 1024, 256], [0, 0, 0, 1]
    r['numel'], r['data'] = 256, r['data'][:1024].ljust(1024, b'\0')
  elif case == 'negative_shape':
    r['shape'] = [-1] + r['shape'][1:]
  elif case == 'rank_mismatch':
    r['stride'] = r['stride'] + [1]
  elif case == 'storage_missing':
    del r['data']
  elif case == 'storage_cut_short':
    r['data'] = r['data'][:len(r['data']) // 2]
  elif case == 'dtype_mismatch':  # Says float64: the float32 bytes are half what that needs.
    r['storage_type'] = 'DoubleStorage'
  elif case == 'not_a_storage_type':
    r['type_pickle'] = _global('collections', 'OrderedDict')
  elif case == 'integer_weights':
    r['storage_type'] = 'LongStorage'
    r['data'] = np.zeros((r['numel'],), '<i8').tobytes()
  else:
    raise ValueError(case)
  del n
  return recs


TENSOR_CASES = ('negative_stride', 'negative_offset', 'offset_past_storage', 'overflowing_offset',
                'overflowing_stride', 'huge_shape_zero_strides', 'negative_shape',
                'rank_mismatch', 'storage_missing', 'storage_cut_short', 'dtype_mismatch',
                'not_a_storage_type')
FILE_CASES = ('truncated_zip', 'foreign_global')


def _write(path, recs, name, case, wrap=None):
  """Writes the crafted file; returns the text its error must contain."""
  if case == 'truncated_zip':
    zip_file(path, recs, wrap)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    return str(path)
  if case == 'foreign_global':
    bad = dict(recs)
    entries = [(k, _tensor(r)) for k, r in bad.items()]
    entries.insert(1, ('evil', _global('os', 'system') + _tuple([_str('true')]) + b'R'))
    with zipfile.ZipFile(path, 'w') as archive:
      archive.writestr('archive/data.pkl', b'\x80\x02' + _ordered_dict(entries) + b'.')
      for r in recs.values():
        archive.writestr(f'archive/data/{r["key"]}', r['data'])
    return 'os.system'
  zip_file(path, _defect(recs, name, case), wrap)
  return repr(name)


# ------------------------------------------------------------------ the readers


def _run_cli(argv, capsys):
  """`convert` in this process (the command's own flag parsing and error handling); returns
  (exit status, stdout, stderr)."""
  values = flags.FlagValues()
  cli.define_flags(values)
  values(['convert'] + argv)
  try:
    cli.main([], values)
    code = 0
  except SystemExit as e:
    code = e.code
  out = capsys.readouterr()
  return code, out.out, out.err


def _diffusers_source(tmp_path, weights):
  folder = tmp_path / 'source'
  folder.mkdir()
  for name in ('config.json', 'scheduler_config.json'):
    shutil.copy(DIFFUSERS / name, folder / name)
  shutil.move(str(weights), folder / 'diffusion_pytorch_model.bin')
  return folder


@pytest.fixture(scope='module')
def diffusers_records():
  path = DIFFUSERS / 'diffusion_pytorch_model.safetensors'
  return records(safetensors_numpy.load_file(str(path)))


@pytest.fixture(scope='module')
def openai_records():
  return records(torch_pickle.load_state_dict(str(OPENAI / 'model.pt')))


def _openai_argv(source, workdir):
  flag_strings = json.loads((OPENAI / 'flags.json').read_text())
  return ['--from=openai', f'--source={source}', f'--workdir={workdir}',
          f'--model_flags={flag_strings["model_flags"]}',
          f'--diffusion_flags={flag_strings["diffusion_flags"]}']


def _assert_one_line_error(code, err, expected, workdir):
  assert code == 1, err
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('convert: error: '), err
  assert expected in lines[0], (expected, lines[0])
  assert 'Traceback' not in err
  assert not pathlib.Path(workdir).exists()


def test_crafted_files_without_a_defect_convert(tmp_path, capsys, diffusers_records,
                                                openai_records):
  """The hand-written files are read as torch's: both importers accept the undamaged ones and
  give the fixtures' tensors back, so each failure below is the defect's."""
  path = zip_file(tmp_path / 'whole.bin', diffusers_records)
  read = torch_pickle.load_state_dict(str(path))
  original = safetensors_numpy.load_file(str(DIFFUSERS / 'diffusion_pytorch_model.safetensors'))
  assert sorted(read) == sorted(original)
  for key, value in original.items():
    np.testing.assert_array_equal(read[key], value, err_msg=key)
  source = _diffusers_source(tmp_path, path)
  code, out, err = _run_cli(['--from=diffusers', f'--source={source}',
                             f'--workdir={tmp_path / "run"}'], capsys)
  assert code == 0 and 'Imported' in out, err
  pt = zip_file(tmp_path / 'whole.pt', openai_records)
  code, out, err = _run_cli(_openai_argv(pt, tmp_path / 'run_openai'), capsys)
  assert code == 0 and 'Imported' in out, err
  legacy = legacy_file(tmp_path / 'whole_legacy.pth', diffusers_records)
  read = torch_pickle.load_state_dict(str(legacy))
  for key, value in original.items():
    np.testing.assert_array_equal(read[key], value, err_msg=key)


@pytest.mark.parametrize('case', TENSOR_CASES + FILE_CASES + ('integer_weights',))
def test_diffusers_bin(tmp_path, capsys, diffusers_records, case):
  name = 'mid_block.attentions.0.to_k.weight'
  expected = _write(tmp_path / 'crafted.bin', diffusers_records, name, case)
  source = _diffusers_source(tmp_path, tmp_path / 'crafted.bin')
  if case == 'truncated_zip':
    expected = str(source / 'diffusion_pytorch_model.bin')
  code, _, err = _run_cli(['--from=diffusers', f'--source={source}',
                           f'--workdir={tmp_path / "run"}'], capsys)
  _assert_one_line_error(code, err, expected, tmp_path / 'run')


@pytest.mark.parametrize('case', TENSOR_CASES + FILE_CASES + ('integer_weights',))
def test_openai_pt(tmp_path, capsys, openai_records, case):
  name = 'middle_block.1.qkv.weight'
  expected = _write(tmp_path / 'crafted.pt', openai_records, name, case)
  code, _, err = _run_cli(_openai_argv(tmp_path / 'crafted.pt', tmp_path / 'run'), capsys)
  _assert_one_line_error(code, err, expected, tmp_path / 'run')


INCEPTION_TENSORS = {'net.layers.conv_1.weight': np.ones((32, 3, 3, 3), np.float32),
                     'net.layers.conv_1.beta': np.zeros((32,), np.float32)}


@pytest.mark.parametrize('wrap', [None, 'script'])
@pytest.mark.parametrize('case', TENSOR_CASES + FILE_CASES)
def test_inception_weights(tmp_path, case, wrap):
  """A .pth state dict and a TorchScript-style archive: load_inception raises before it maps
  (or allocates) anything, one line naming the tensor."""
  name = 'net.layers.conv_1.weight'
  recs = records(INCEPTION_TENSORS)
  path = tmp_path / 'inception.pth'
  expected = _write(path, recs, name, case, wrap)
  with pytest.raises((torch_pickle.CorruptFileError, torch_pickle.UnsafePickleError)) as info:
    inception.load_inception(str(path))
  message = str(info.value)
  assert expected in message and '\n' not in message, message


@pytest.mark.parametrize('case', ('storage_cut_short', 'huge_shape_zero_strides',
                                  'negative_stride', 'offset_past_storage'))
def test_inception_legacy_file(tmp_path, case):
  """The legacy (non-zip) format: a storage cut short or a record outside its storage is named."""
  name = 'net.layers.conv_1.weight'
  recs = records(INCEPTION_TENSORS)
  path = legacy_file(tmp_path / 'legacy.pth', _defect(recs, name, case) if case !=
                     'storage_cut_short' else recs)
  if case == 'storage_cut_short':  # The file ends inside the first storage.
    data = path.read_bytes()
    path.write_bytes(data[:len(data) - len(recs['net.layers.conv_1.beta']['data']) - 8 - 100])
  with pytest.raises(torch_pickle.CorruptFileError) as info:
    inception.load_inception(str(path))
  assert repr(name) in str(info.value) and '\n' not in str(info.value), str(info.value)


def test_a_storage_view_outside_its_storage_is_refused(tmp_path):
  """Legacy view records (view key, offset, size) are checked against the storage too."""
  recs = records(INCEPTION_TENSORS)
  recs['net.layers.conv_1.beta']['view'] = ('v', 10, 1 << 40)
  path = legacy_file(tmp_path / 'view.pth', recs)
  with pytest.raises(torch_pickle.CorruptFileError, match=r"'net\.layers\.conv_1\.beta'.*view"):
    torch_pickle.open_state_dict(str(path))


def test_containers_are_kept_or_refused_not_dropped(tmp_path):
  """Lists and tuples of tensors keep their tensors under index names; numbers are skipped; a
  set, a cycle or a bare storage is an error naming the entry."""
  recs = records({'w': np.arange(6, dtype=np.float32).reshape(2, 3)})
  tensor = _tensor(recs['w'])
  body = (_global('collections', 'OrderedDict') + b')R(' + _str('blocks') + b'(' + tensor +
          tensor + b'l' + _str('pair') + _tuple([tensor, _int(3)]) + _str('n') + _int(7) + b'u')
  path = tmp_path / 'lists.pth'
  with zipfile.ZipFile(path, 'w') as archive:
    archive.writestr('archive/data.pkl', b'\x80\x02' + body + b'.')
    archive.writestr('archive/data/0', recs['w']['data'])
  state = torch_pickle.load_state_dict(str(path))
  assert sorted(state) == ['blocks.0', 'blocks.1', 'pair.0']
  np.testing.assert_array_equal(state['blocks.1'], np.arange(6).reshape(2, 3))

  def refused(body, match):
    with zipfile.ZipFile(path, 'w') as archive:
      archive.writestr('archive/data.pkl', b'\x80\x04' + body + b'.')
      archive.writestr('archive/data/0', recs['w']['data'])
    with pytest.raises(torch_pickle.CorruptFileError, match=match):
      torch_pickle.open_state_dict(str(path))

  refused(b'}(' + _str('s') + b'\x8f(' + _int(1) + b'\x90u', r"entry 's' is a set")
  # A list that contains itself: ] (empty list), memoize, append the memo'd list to it.
  refused(b'}(' + _str('loop') + b']\x94h\x00' + b'a' + b'u',
          r"entry 'loop.0' is the container already read as 'loop'")
  pid = _tuple([_str('storage'), _global('torch', 'FloatStorage'), _str('0'), _str('cpu'),
                _int(6)]) + b'Q'
  refused(b'}(' + _str('raw') + pid + b'u', r"entry 'raw' is a bare storage")


@pytest.mark.parametrize('case', ('huge_shape_zero_strides', 'foreign_global', 'truncated_zip'))
def test_command_line_exits_1_with_one_line(tmp_path, diffusers_records, case):
  """The real program (`python -m diffusion_jax.convert`) behaves as the in-process runs."""
  expected = _write(tmp_path / 'crafted.bin', diffusers_records, 'conv_out.weight', case)
  source = _diffusers_source(tmp_path, tmp_path / 'crafted.bin')
  if case == 'truncated_zip':
    expected = 'truncated'
  env = {**os.environ, 'PYTHONPATH': str(ROOT), 'JAX_PLATFORMS': 'cpu'}
  done = subprocess.run([sys.executable, '-m', 'diffusion_jax.convert', '--from=diffusers',
                         f'--source={source}', f'--workdir={tmp_path / "run"}'], cwd=ROOT,
                        env=env, capture_output=True, text=True, check=False, timeout=300)
  assert done.returncode == 1, done.stderr
  last = done.stderr.strip().splitlines()[-1]
  assert last.startswith('convert: error: ') and expected in last, done.stderr
  assert 'Traceback' not in done.stderr and done.stderr.count('convert: error') == 1
  assert not (tmp_path / 'run').exists()
