"""The phases of one Winograd convolution in contrib/onednn/csrc/onednn_conv.cc, against the
direct one.

  python benchmarks/winograd_phases.py                          # the digits and cifar shapes
  python benchmarks/winograd_phases.py --shapes=32x8x32x32 --threads=1

Compiles a small C++ program that includes the kernel's source (so it times exactly the
functions the XLA custom calls run) and, per shape batch x side x in x out channels, times with
`--threads` OpenMP threads (median of `--repeats` calls, microseconds):
- each Winograd phase: the input and kernel transforms, the 36 batched matrix products of each
  direction, the output transform and the transposed transforms of the gradients;
- each direction whole, by Winograd and by oneDNN's direct primitive, whatever the kernel's rule
  (`WinogradApplies`) would choose, so that the rule's thresholds can be checked.
One JSON line per shape. Needs the `onednn` extra and a C++ compiler, like the kernel.
"""

import json
import os
import pathlib
import subprocess
import sys
import tempfile

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from diffusion_jax.contrib.onednn import conv as onednn_conv  # pylint: disable=g-import-not-at-top

_SHAPES = flags.DEFINE_list(
    'shapes', ['32x8x32x32', '32x8x64x64', '32x8x96x32', '32x4x64x64', '8x32x128x128',
               '8x16x256x256'],
    'batch x side x in channels x out channels per layer (3x3, stride 1, padding 1): the digits '
    "U-Net's layers at a device's 32 images, cifar10_ddpm's at 8.")
_THREADS = flags.DEFINE_integer('threads', 1, 'OpenMP threads per call (a device\'s share).')
_REPEATS = flags.DEFINE_integer('repeats', 100, 'Timed calls per phase.')
_SOURCE = flags.DEFINE_string(
    'source', None, 'Kernel source to time instead of the package\'s, e.g. an older revision: '
    '`git show REV:diffusion_jax/contrib/onednn/csrc/onednn_conv.cc > old.cc` (before the '
    'package layout: diffusion_jax/csrc/onednn_conv.cc).')

# Times each phase of WinogradConvolution / WinogradKernelGradient (one pass of all tiles) and
# each direction of Run with the Winograd algorithm forced on or off.
_PROGRAM = r'''
#include "@SOURCE@"
#include <chrono>
#include <cstdio>
#include <random>

namespace {
template <class F> double MedianMicros(F f, int repeats) {
  f();
  std::vector<double> t;
  for (int r = 0; r < repeats; ++r) {
    const auto start = std::chrono::steady_clock::now();
    f();
    t.push_back(std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - start).count());
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}
}  // namespace

int main(int argc, char** argv) {
  const int64_t n = atol(argv[1]), h = atol(argv[2]), c = atol(argv[3]), o = atol(argv[4]);
  const int threads = atoi(argv[5]), repeats = atoi(argv[6]);
  omp_set_num_threads(threads);
  std::mt19937 rng(0);
  std::normal_distribution<float> normal;
  auto random = [&](size_t size) { std::vector<float> v(size); for (auto& e : v) e = normal(rng); return v; };
  std::vector<float> x = random(n * h * h * c), w = random(9 * c * o), dy = random(n * h * h * o);
  std::vector<float> y(n * h * h * o), dx(n * h * h * c), dw(9 * c * o);
  const TileGrid grid(n, h, h);
  const int64_t tiles = grid.count, widest = std::max(c, o);
  std::vector<float> v(kT * tiles * widest), u(kT * c * o), m(kT * tiles * widest), du(kT * c * o);
  const Geometry g{{n, h, h, c, 3, 3, o, h, h, 1, 1, 1, 1, 1, 1, threads}};
  std::printf("{\"input_transform\": %.1f", MedianMicros([&] { InputTransform(x.data(), c, grid, 0, tiles, v.data()); }, repeats));
  std::printf(", \"kernel_transform\": %.1f", MedianMicros([&] { KernelTransform(w.data(), c, o, false, u.data()); }, repeats));
  std::printf(", \"matmul_forward\": %.1f", MedianMicros([&] { BatchedMatmul(kT, tiles, c, o, false, false, v.data(), u.data(), m.data(), threads); }, repeats));
  std::printf(", \"output_transform\": %.1f", MedianMicros([&] { OutputTransform(m.data(), o, grid, 0, tiles, y.data()); }, repeats));
  std::printf(", \"matmul_input_gradient\": %.1f", MedianMicros([&] { BatchedMatmul(kT, tiles, o, c, false, true, v.data(), u.data(), m.data(), threads); }, repeats));
  std::printf(", \"output_transform_transpose\": %.1f", MedianMicros([&] { OutputTransformTranspose(dy.data(), o, grid, 0, tiles, m.data()); }, repeats));
  std::printf(", \"matmul_kernel_gradient\": %.1f", MedianMicros([&] { BatchedMatmul(kT, c, tiles, o, true, false, v.data(), m.data(), du.data(), threads); }, repeats));
  std::printf(", \"kernel_transform_transpose\": %.1f", MedianMicros([&] { KernelTransformTranspose(du.data(), c, o, dw.data()); }, repeats));
  std::printf(", \"winograd_forward\": %.1f", MedianMicros([&] { WinogradConvolution(g, false, x.data(), w.data(), y.data()); }, repeats));
  std::printf(", \"winograd_input_gradient\": %.1f", MedianMicros([&] { WinogradConvolution(g, true, dy.data(), w.data(), dx.data()); }, repeats));
  std::printf(", \"winograd_kernel_gradient\": %.1f", MedianMicros([&] { WinogradKernelGradient(g, x.data(), dy.data(), dw.data()); }, repeats));
  std::printf(", \"direct_forward\": %.1f", MedianMicros([&] { Run(Direction::kForward, g, false, x.data(), w.data(), y.data()); }, repeats));
  std::printf(", \"direct_input_gradient\": %.1f", MedianMicros([&] { Run(Direction::kInputGradient, g, false, dx.data(), w.data(), dy.data()); }, repeats));
  std::printf(", \"direct_kernel_gradient\": %.1f", MedianMicros([&] { Run(Direction::kKernelGradient, g, false, x.data(), dw.data(), dy.data()); }, repeats));
  std::printf(", \"rule_takes_winograd\": %s}\n", WinogradApplies(g) ? "true" : "false");
}
'''


def main(argv):
  del argv
  reason = onednn_conv.unavailable_reason()
  if reason:
    raise SystemExit(reason)
  with tempfile.TemporaryDirectory() as tmp:
    source = pathlib.Path(tmp) / 'winograd_phases.cc'
    program = pathlib.Path(tmp) / 'winograd_phases'
    kernel = os.path.abspath(_SOURCE.value) if _SOURCE.value else str(onednn_conv._SOURCE)  # pylint: disable=protected-access
    source.write_text(_PROGRAM.replace('@SOURCE@', kernel))
    result = subprocess.run(onednn_conv.compile_command(source, program, shared=False),
                            capture_output=True, text=True, check=False)
    if result.returncode:
      raise SystemExit(result.stderr[-4000:])
    for shape in _SHAPES.value:
      n, side, cin, cout = (int(v) for v in shape.split('x'))
      out = subprocess.run([str(program), str(n), str(side), str(cin), str(cout),
                            str(_THREADS.value), str(_REPEATS.value)],
                           capture_output=True, text=True, check=True).stdout
      row = json.loads(out)
      winograd = sum(row[f'winograd_{d}'] for d in ('forward', 'input_gradient', 'kernel_gradient'))
      direct = sum(row[f'direct_{d}'] for d in ('forward', 'input_gradient', 'kernel_gradient'))
      print(json.dumps({'benchmark': 'winograd_phases', 'source': os.path.basename(kernel),
                        'shape': shape, 'tiles': n * ((side + 3) // 4) ** 2,
                        'threads': _THREADS.value, 'micros': row,
                        'direct_over_winograd': round(direct / winograd, 3)}), flush=True)


if __name__ == '__main__':
  app.run(main)
