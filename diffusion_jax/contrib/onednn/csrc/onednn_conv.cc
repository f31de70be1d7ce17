// 2-D convolutions for XLA:CPU as FFI custom calls backed by oneDNN (diffusion_jax/onednn_conv.py).
//
// Layouts are the U-Net's: activations NHWC, kernels HWIO, float32. Three targets, one per
// direction: forward y = x * w, the input gradient dx from (dy, w) and the kernel gradient dw from
// (x, dy). Each call runs oneDNN's primitive for its geometry on `threads` OpenMP threads; the
// primitive (and the reorder of the kernel to or from oneDNN's blocked layout) is created once per
// geometry and thread count and then reused.
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <exception>
#include <map>
#include <memory>
#include <mutex>
#include <new>
#include <string>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using Tag = dnnl::memory::format_tag;
using Type = dnnl::memory::data_type;

namespace {

enum class Direction { kForward, kInputGradient, kKernelGradient };

// Sizes of one convolution: x [n, h, w, ci], kernel [kh, kw, ci, co], y [n, oh, ow, co].
struct Geometry {
  std::vector<int64_t> values;  // n h w ci kh kw co oh ow, strides, pads (t b l r), threads.
  int64_t operator[](int i) const { return values[i]; }
};

dnnl::engine& CpuEngine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

struct Descriptors {
  memory::desc x, kernel_hwio, kernel_any, y;
  memory::dims strides, pad_before, pad_after;
};

Descriptors MakeDescriptors(const Geometry& g) {
  Descriptors d;
  d.x = memory::desc({g[0], g[3], g[1], g[2]}, Type::f32, Tag::nhwc);
  d.kernel_hwio = memory::desc({g[6], g[3], g[4], g[5]}, Type::f32, Tag::hwio);
  d.kernel_any = memory::desc({g[6], g[3], g[4], g[5]}, Type::f32, Tag::any);
  d.y = memory::desc({g[0], g[6], g[7], g[8]}, Type::f32, Tag::nhwc);
  d.strides = {g[9], g[10]};
  d.pad_before = {g[11], g[13]};
  d.pad_after = {g[12], g[14]};
  return d;
}

// Primitives use caller-provided scratchpads: XLA runs the devices' calls on several threads at
// once, and oneDNN's own (library-managed) scratchpad is shared between them.
struct Plan {
  Descriptors descriptors;
  dnnl::primitive convolution;
  memory::desc scratchpad;
  memory::desc kernel_layout;  // oneDNN's preferred kernel layout for this primitive.
  bool reorder_kernel = false;
  dnnl::reorder kernel_reorder;
  memory::desc reorder_scratchpad;
};

dnnl::primitive_attr UserScratchpad() {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return attr;
}

Plan MakePlan(Direction direction, const Geometry& g) {
  Plan plan;
  plan.descriptors = MakeDescriptors(g);
  const Descriptors& d = plan.descriptors;
  const auto forward_hint = dnnl::convolution_forward::primitive_desc(
      CpuEngine(), dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct, d.x,
      d.kernel_any, d.y, d.strides, d.pad_before, d.pad_after, UserScratchpad());
  if (direction == Direction::kForward) {
    plan.convolution = dnnl::convolution_forward(forward_hint);
    plan.kernel_layout = forward_hint.weights_desc();
    plan.scratchpad = forward_hint.scratchpad_desc();
  } else if (direction == Direction::kInputGradient) {
    const auto pd = dnnl::convolution_backward_data::primitive_desc(
        CpuEngine(), dnnl::algorithm::convolution_direct, d.x, d.kernel_any, d.y, d.strides,
        d.pad_before, d.pad_after, forward_hint, UserScratchpad());
    plan.convolution = dnnl::convolution_backward_data(pd);
    plan.kernel_layout = pd.weights_desc();
    plan.scratchpad = pd.scratchpad_desc();
  } else {
    const auto pd = dnnl::convolution_backward_weights::primitive_desc(
        CpuEngine(), dnnl::algorithm::convolution_direct, d.x, d.kernel_any, d.y, d.strides,
        d.pad_before, d.pad_after, forward_hint, UserScratchpad());
    plan.convolution = dnnl::convolution_backward_weights(pd);
    plan.kernel_layout = pd.diff_weights_desc();
    plan.scratchpad = pd.scratchpad_desc();
  }
  plan.reorder_kernel = plan.kernel_layout != d.kernel_hwio;
  if (plan.reorder_kernel) {
    const bool to_user = direction == Direction::kKernelGradient;
    const auto pd = dnnl::reorder::primitive_desc(
        CpuEngine(), to_user ? plan.kernel_layout : d.kernel_hwio, CpuEngine(),
        to_user ? d.kernel_hwio : plan.kernel_layout, UserScratchpad());
    plan.kernel_reorder = dnnl::reorder(pd);
    plan.reorder_scratchpad = pd.scratchpad_desc();
  }
  return plan;
}

const Plan& CachedPlan(Direction direction, const Geometry& g) {
  static std::mutex mutex;
  static auto* plans = new std::map<std::vector<int64_t>, std::unique_ptr<Plan>>();
  std::vector<int64_t> key = g.values;
  key.push_back(static_cast<int64_t>(direction));
  std::lock_guard<std::mutex> lock(mutex);
  auto it = plans->find(key);
  if (it == plans->end()) {
    it = plans->emplace(key, std::make_unique<Plan>(MakePlan(direction, g))).first;
  }
  return *it->second;
}

// Memory that a call needs only while it runs (the scratchpads, the kernel in oneDNN's layout),
// kept per calling thread and only ever grown, so that calls do not allocate (and fault in) it
// each time. XLA runs one call at a time on each thread.
class ThreadBuffer {
 public:
  ThreadBuffer() = default;
  ThreadBuffer(const ThreadBuffer&) = delete;
  ThreadBuffer& operator=(const ThreadBuffer&) = delete;
  ~ThreadBuffer() { std::free(data_); }
  void* Get(size_t bytes) {
    if (bytes > size_ || data_ == nullptr) {
      std::free(data_);
      size_ = (bytes + 64) / 64 * 64;  // At least 64: a zero-size scratchpad still gets a pointer.
      data_ = std::aligned_alloc(64, size_);
      if (data_ == nullptr) throw std::bad_alloc();
    }
    return data_;
  }

 private:
  void* data_ = nullptr;
  size_t size_ = 0;
};

memory ThreadMemory(const memory::desc& desc, ThreadBuffer& buffer) {
  return memory(desc, CpuEngine(), buffer.Get(desc.get_size()));
}

// ---------------------------------------------------------------------------------------------
// Winograd F(4x4, 3x3). Output tiles of 4x4 (m) from input tiles of 6x6 (a = m + 2), at the
// interpolation points 0, 1, -1, 2, -2 and infinity:
//   Y = A^T [ (G w G^T) . (B^T d B) ] A   per tile d, summed over input channels,
// where "." is the elementwise product over the 36 positions; for each position t that sum over
// channels is a matrix product V[t] (tiles x C) @ U[t] (C x O).
constexpr int kM = 4, kA = 6, kT = kA * kA;
constexpr float kBT[kA][kA] = {{4, 0, -5, 0, 1, 0},  {0, -4, -4, 1, 1, 0}, {0, 4, -4, -1, 1, 0},
                               {0, -2, -1, 2, 1, 0}, {0, 2, -1, -2, 1, 0}, {0, 4, 0, -5, 0, 1}};
constexpr float kG[kA][3] = {{1.f / 4, 0, 0},
                             {-1.f / 6, -1.f / 6, -1.f / 6},
                             {-1.f / 6, 1.f / 6, -1.f / 6},
                             {1.f / 24, 1.f / 12, 1.f / 6},
                             {1.f / 24, -1.f / 12, 1.f / 6},
                             {0, 0, 1}};
constexpr float kAT[kM][kA] = {
    {1, 1, 1, 1, 1, 0}, {0, 1, -1, 2, -2, 0}, {0, 1, 1, 4, 4, 0}, {0, 1, -1, 8, -8, 1}};
// The transposes, for the gradients: G^T takes a 6x6 kernel gradient back to 3x3, A takes a 4x4
// output gradient to the 36 positions.
constexpr float kGT[3][kA] = {{1.f / 4, -1.f / 6, -1.f / 6, 1.f / 24, 1.f / 24, 0},
                              {0, -1.f / 6, 1.f / 6, 1.f / 12, -1.f / 12, 0},
                              {0, -1.f / 6, -1.f / 6, 1.f / 6, 1.f / 6, 1}};
constexpr float kAMatrix[kA][kM] = {{1, 0, 0, 0},  {1, 1, 1, 1},  {1, -1, 1, -1},
                                    {1, 2, 4, 8},  {1, -2, 4, -8}, {0, 0, 0, 1}};

template <int R, int C>
constexpr bool IsTranspose(const float (&a)[R][C], const float (&b)[C][R]) {
  for (int i = 0; i < R; ++i) {
    for (int j = 0; j < C; ++j) {
      if (a[i][j] != b[j][i]) return false;
    }
  }
  return true;
}
static_assert(IsTranspose(kG, kGT) && IsTranspose(kAT, kAMatrix), "transposes out of step");

constexpr int64_t kChannelBlock = 64;  // Channels per OpenMP work item of the transforms.

// Below these sizes the direct convolution is as fast or faster (benchmarks/RESULTS.md, "Winograd
// transforms in registers"): tiles per call and channels on either side (at 8 tiles or 16
// channels the two algorithms tie, at 4 tiles the direct one wins). Feature maps smaller than a
// tile would waste most of it (a 2x2 map takes as many products as the direct algorithm).
constexpr int64_t kMinWinogradTiles = 16, kMinWinogradChannels = 32;
// Tiles per pass: the transformed tiles of a call (36 x tiles x channels floats on either side)
// are made and multiplied this many tiles at a time, so their buffers stay bounded (~75 MB at 256
// channels) whatever the batch, and each of the 36 matrix products stays large.
constexpr int64_t kTilesPerPass = 2048;

// The tiles of one call: images n of h x w, covered by th x tw output tiles.
struct TileGrid {
  int64_t n, h, w, th, tw, count;
  TileGrid(int64_t n, int64_t h, int64_t w)
      : n(n), h(h), w(w), th((h + kM - 1) / kM), tw((w + kM - 1) / kM), count(n * th * tw) {}
  int64_t Image(int64_t tile) const { return tile / (th * tw); }
  int64_t Row(int64_t tile) const { return (tile / tw) % th * kM; }  // First row of the output tile.
  int64_t Col(int64_t tile) const { return tile % tw * kM; }
};

bool WinogradApplies(const Geometry& g) {
  const bool three_by_three_same = g[4] == 3 && g[5] == 3 && g[9] == 1 && g[10] == 1 &&
                                   g[11] == 1 && g[12] == 1 && g[13] == 1 && g[14] == 1;
  return three_by_three_same && std::min(g[1], g[2]) >= kM &&
         TileGrid(g[0], g[1], g[2]).count >= kMinWinogradTiles &&
         std::min(g[3], g[6]) >= kMinWinogradChannels;
}

// out[i][j] = (T d T^T)[i][j] for the In x In tile d = in[r][s] and the Out x In matrix T, per
// channel k < width <= kChannelBlock: T applied to the tile's columns, then to its rows, kLanes
// channels at a time with every loop over the tile unrolled, so that T's entries are constants
// (its zeros cost nothing) and a slice of the tile stays in vector registers.
constexpr int64_t kLanes = 16;
template <int In, int Out>
__attribute__((always_inline)) inline void TransformTile(const float (&t)[Out][In],
                                                         const float* const (&in)[In][In],
                                                         int64_t width,
                                                         float* const (&out)[Out][Out]) {
  for (int64_t k0 = 0; k0 < width; k0 += kLanes) {
    const int64_t lanes = std::min(kLanes, width - k0);  // Fewer only in the last channels.
    float d[In][In][kLanes], rows[Out][In][kLanes];  // The tile's slice, then (T d)[i][s].
    if (lanes == kLanes) {
#pragma GCC unroll 8
      for (int r = 0; r < In; ++r)
#pragma GCC unroll 8
        for (int s = 0; s < In; ++s)
#pragma GCC unroll 16
          for (int l = 0; l < kLanes; ++l) d[r][s][l] = in[r][s][k0 + l];
    } else {
      for (int r = 0; r < In; ++r)
        for (int s = 0; s < In; ++s)
          for (int l = 0; l < kLanes; ++l) d[r][s][l] = l < lanes ? in[r][s][k0 + l] : 0.f;
    }
#pragma GCC unroll 8
    for (int i = 0; i < Out; ++i) {
#pragma GCC unroll 8
      for (int s = 0; s < In; ++s) {
        float acc[kLanes] = {};
#pragma GCC unroll 8
        for (int r = 0; r < In; ++r) {
          if (t[i][r] == 0.f) continue;
#pragma GCC unroll 16
          for (int l = 0; l < kLanes; ++l) acc[l] += t[i][r] * d[r][s][l];
        }
#pragma GCC unroll 16
        for (int l = 0; l < kLanes; ++l) rows[i][s][l] = acc[l];
      }
    }
#pragma GCC unroll 8
    for (int i = 0; i < Out; ++i) {
#pragma GCC unroll 8
      for (int j = 0; j < Out; ++j) {
        float acc[kLanes] = {};
#pragma GCC unroll 8
        for (int s = 0; s < In; ++s) {
          if (t[j][s] == 0.f) continue;
#pragma GCC unroll 16
          for (int l = 0; l < kLanes; ++l) acc[l] += t[j][s] * rows[i][s][l];
        }
        if (lanes == kLanes) {
#pragma GCC unroll 16
          for (int l = 0; l < kLanes; ++l) out[i][j][k0 + l] = acc[l];
        } else {
          for (int l = 0; l < lanes; ++l) out[i][j][k0 + l] = acc[l];
        }
      }
    }
  }
}

// Where channel c0 of row k (of a pass of `count` tiles) at position t lies in a transformed
// buffer [kT, count, channels]: the layout of V, M and dM that the batched matmuls read and write.
inline int64_t TransformedOffset(int t, int64_t count, int64_t k, int64_t channels, int64_t c0) {
  return (t * count + k) * channels + c0;
}

// Pointers to the N x N tile of the feature map `map` [n, h, w, channels] whose top-left pixel
// is `offset` rows and columns from the output tile's, at channel c0; pixels outside the image
// point at `zeros` (at least kChannelBlock zeros).
template <int N>
__attribute__((always_inline)) inline void TilePointers(const float* map, int64_t channels,
                                                        const TileGrid& grid, int64_t tile,
                                                        int64_t offset, int64_t c0,
                                                        const float* zeros,
                                                        const float* (&pointers)[N][N]) {
  for (int r = 0; r < N; ++r) {
    for (int s = 0; s < N; ++s) {
      const int64_t y = grid.Row(tile) + r + offset, x = grid.Col(tile) + s + offset;
      pointers[r][s] = (y < 0 || y >= grid.h || x < 0 || x >= grid.w)
                           ? zeros
                           : map + ((grid.Image(tile) * grid.h + y) * grid.w + x) * channels + c0;
    }
  }
}

// For one tile and channel block: the N x N tile of `map` (see TilePointers) times T on both
// sides, written to out[t][k][channels] at the kA x kA positions t, k = tile - first being the
// tile's row in a pass of `count` tiles. (The OpenMP loops over tiles stay in the target_clones
// functions: a parallel region is outlined where it is written, and only the clones are compiled
// for AVX-512 and AVX2.)
template <int N>
__attribute__((always_inline)) inline void TransformTileOfMap(const float (&t)[kA][N],
                                                              const float* map, int64_t channels,
                                                              const TileGrid& grid, int64_t first,
                                                              int64_t count, int64_t tile,
                                                              int64_t offset, int64_t c0,
                                                              float* out) {
  const int64_t width = std::min(kChannelBlock, channels - c0);
  alignas(64) static const float zeros[kChannelBlock] = {};
  const float* in[N][N];
  float* positions[kA][kA];
  TilePointers(map, channels, grid, tile, offset, c0, zeros, in);
  for (int i = 0; i < kA; ++i) {
    for (int j = 0; j < kA; ++j) {
      positions[i][j] = out + TransformedOffset(i * kA + j, count, tile - first, channels, c0);
    }
  }
  TransformTile(t, in, width, positions);
}

// v[t][tile - first][c] = (B^T d B)[t] for the 6x6 tile d of x [n, h, w, c] around the output
// tile (the convolution's padding of 1: one pixel before it, zeros outside the image), for the
// `count` tiles from `first`.
__attribute__((target_clones("avx512f", "avx2", "default")))
void InputTransform(const float* x, int64_t c, const TileGrid& grid, int64_t first,
                    int64_t count, float* v) {
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t tile = first; tile < first + count; ++tile) {
    for (int64_t c0 = 0; c0 < c; c0 += kChannelBlock) {
      TransformTileOfMap(kBT, x, c, grid, first, count, tile, -1, c0, v);
    }
  }
}

// The transpose of OutputTransform: dm[t][tile - first][o] = (A dY A^T)[t] for the 4x4 tile dY
// of dy (zero beyond the image's edge), for the `count` tiles from `first`.
__attribute__((target_clones("avx512f", "avx2", "default")))
void OutputTransformTranspose(const float* dy, int64_t o, const TileGrid& grid, int64_t first,
                              int64_t count, float* dm) {
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t tile = first; tile < first + count; ++tile) {
    for (int64_t o0 = 0; o0 < o; o0 += kChannelBlock) {
      TransformTileOfMap(kAMatrix, dy, o, grid, first, count, tile, 0, o0, dm);
    }
  }
}

// y [n, h, w, o] from m[t][tile - first][o]: the 4x4 output tiles (A^T M A) of the `count` tiles
// from `first`, cut at the image's edge.
__attribute__((target_clones("avx512f", "avx2", "default")))
void OutputTransform(const float* m, int64_t o, const TileGrid& grid, int64_t first,
                     int64_t count, float* y) {
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t tile = first; tile < first + count; ++tile) {
    for (int64_t o0 = 0; o0 < o; o0 += kChannelBlock) {
      const int64_t width = std::min(kChannelBlock, o - o0);
      alignas(64) float beyond[kChannelBlock];  // Where the outputs beyond the image's edge go.
      const float* positions[kA][kA];
      float* pixels[kM][kM];
      for (int i = 0; i < kA; ++i) {
        for (int j = 0; j < kA; ++j) {
          positions[i][j] = m + TransformedOffset(i * kA + j, count, tile - first, o, o0);
        }
      }
      for (int p = 0; p < kM; ++p) {
        for (int q = 0; q < kM; ++q) {
          const int64_t row = grid.Row(tile) + p, col = grid.Col(tile) + q;
          pixels[p][q] = row < grid.h && col < grid.w
                             ? y + ((grid.Image(tile) * grid.h + row) * grid.w + col) * o + o0
                             : beyond;
        }
      }
      TransformTile(kAT, positions, width, pixels);
    }
  }
}

// For input channel ci and output channels o0 ..: the In x In taps of a kernel [In, In, c, o]
// times T on both sides, written as [Out, Out, c, o]; `flip` reads tap (In-1-r, In-1-s) for (r, s).
template <int In, int Out>
__attribute__((always_inline)) inline void TransformKernelChannels(const float (&t)[Out][In],
                                                                   const float* kernel, int64_t c,
                                                                   int64_t o, bool flip,
                                                                   int64_t ci, int64_t o0,
                                                                   float* out) {
  const int64_t co = c * o, offset = ci * o + o0, width = std::min(kChannelBlock, o - o0);
  const float* taps[In][In];
  float* transformed[Out][Out];
  for (int r = 0; r < In; ++r) {
    for (int s = 0; s < In; ++s) {
      taps[r][s] = kernel + ((flip ? In - 1 - r : r) * In + (flip ? In - 1 - s : s)) * co + offset;
    }
  }
  for (int i = 0; i < Out; ++i) {
    for (int j = 0; j < Out; ++j) transformed[i][j] = out + (i * Out + j) * co + offset;
  }
  TransformTile(t, taps, width, transformed);
}

// u[t][c][o] = (G w G^T)[t] for the kernel w [3, 3, c, o], or with `flip` for w[2-r][2-s]
// (the input gradient's kernel, used transposed).
__attribute__((target_clones("avx512f", "avx2", "default")))
void KernelTransform(const float* w, int64_t c, int64_t o, bool flip, float* u) {
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t ci = 0; ci < c; ++ci) {
    for (int64_t o0 = 0; o0 < o; o0 += kChannelBlock) {
      TransformKernelChannels(kG, w, c, o, flip, ci, o0, u);
    }
  }
}

// The transpose of KernelTransform: dw[r][s][c][o] = (G^T dU G)[r][s].
__attribute__((target_clones("avx512f", "avx2", "default")))
void KernelTransformTranspose(const float* du, int64_t c, int64_t o, float* dw) {
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t ci = 0; ci < c; ++ci) {
    for (int64_t o0 = 0; o0 < o; o0 += kChannelBlock) {
      TransformKernelChannels(kGT, du, c, o, false, ci, o0, dw);
    }
  }
}

// c[b] = a[b] @ k[b] (or, `accumulate`, c[b] += a[b] @ k[b]) for b < batch: a [m, k] (or,
// `a_transposed`, stored as [k, m]), k [k, n] (or stored as [n, k]); oneDNN's matmul, created
// once per shape.
struct MatmulPlan {
  dnnl::matmul matmul;
  memory::desc a, b, c, scratchpad;
};

const MatmulPlan& CachedMatmul(const std::vector<int64_t>& key) {
  static std::mutex mutex;
  static auto* plans = new std::map<std::vector<int64_t>, std::unique_ptr<MatmulPlan>>();
  std::lock_guard<std::mutex> lock(mutex);
  auto it = plans->find(key);
  if (it == plans->end()) {
    const int64_t batch = key[0], m = key[1], k = key[2], n = key[3];
    auto plan = std::make_unique<MatmulPlan>();
    plan->a = memory::desc({batch, m, k}, Type::f32,
                           key[4] ? memory::dims{m * k, 1, m} : memory::dims{m * k, k, 1});
    plan->b = memory::desc({batch, k, n}, Type::f32,
                           key[5] ? memory::dims{k * n, 1, k} : memory::dims{k * n, n, 1});
    plan->c = memory::desc({batch, m, n}, Type::f32, memory::dims{m * n, n, 1});
    dnnl::primitive_attr attr = UserScratchpad();
    if (key[7]) {
      dnnl::post_ops sum;
      sum.append_sum(1.f);
      attr.set_post_ops(sum);
    }
    const auto pd = dnnl::matmul::primitive_desc(CpuEngine(), plan->a, plan->b, plan->c, attr);
    plan->matmul = dnnl::matmul(pd);
    plan->scratchpad = pd.scratchpad_desc();
    it = plans->emplace(key, std::move(plan)).first;
  }
  return *it->second;
}

void BatchedMatmul(int64_t batch, int64_t m, int64_t k, int64_t n, bool a_transposed,
                   bool b_transposed, const float* a, const float* b, float* c, int64_t threads,
                   bool accumulate = false) {
  const MatmulPlan& plan =
      CachedMatmul({batch, m, k, n, a_transposed, b_transposed, threads, accumulate});
  thread_local ThreadBuffer scratchpad_buffer;
  dnnl::stream stream(CpuEngine());
  memory a_mem(plan.a, CpuEngine(), const_cast<float*>(a));
  memory b_mem(plan.b, CpuEngine(), const_cast<float*>(b));
  memory c_mem(plan.c, CpuEngine(), c);
  plan.matmul.execute(stream, {{DNNL_ARG_SRC, a_mem},
                               {DNNL_ARG_WEIGHTS, b_mem},
                               {DNNL_ARG_DST, c_mem},
                               {DNNL_ARG_SCRATCHPAD, ThreadMemory(plan.scratchpad, scratchpad_buffer)}});
  stream.wait();
}

float* ThreadFloats(ThreadBuffer& buffer, int64_t count) {
  return static_cast<float*>(buffer.Get(sizeof(float) * count));
}

// Forward: y = x * w. Input gradient (`input_gradient`): dx = dy * flip(w) with the kernel's
// channels swapped, the same algorithm on (dy, w). in/out are the activations read and written;
// the tiles go kTilesPerPass at a time.
void WinogradConvolution(const Geometry& g, bool input_gradient, const float* in,
                         const float* kernel, float* out) {
  const TileGrid grid(g[0], g[1], g[2]);
  const int64_t c = g[3], o = g[6], pass = std::min(grid.count, kTilesPerPass);
  const int64_t c_in = input_gradient ? o : c, c_out = input_gradient ? c : o;
  thread_local ThreadBuffer v_buffer, u_buffer, m_buffer;
  float* v = ThreadFloats(v_buffer, kT * pass * c_in);
  float* u = ThreadFloats(u_buffer, kT * c * o);
  float* m = ThreadFloats(m_buffer, kT * pass * c_out);
  KernelTransform(kernel, c, o, input_gradient, u);  // u[t] is [c, o]: used as [o, c] for dx.
  for (int64_t first = 0; first < grid.count; first += pass) {
    const int64_t count = std::min(pass, grid.count - first);
    InputTransform(in, c_in, grid, first, count, v);
    BatchedMatmul(kT, count, c_in, c_out, false, input_gradient, v, u, m, g[15]);
    OutputTransform(m, c_out, grid, first, count, out);
  }
}

// dw = sum over tiles of V^T dM per position (accumulated pass by pass), transformed back to the
// 3x3 kernel.
void WinogradKernelGradient(const Geometry& g, const float* x, const float* dy, float* dw) {
  const TileGrid grid(g[0], g[1], g[2]);
  const int64_t c = g[3], o = g[6], pass = std::min(grid.count, kTilesPerPass);
  thread_local ThreadBuffer v_buffer, dm_buffer, du_buffer;
  float* v = ThreadFloats(v_buffer, kT * pass * c);
  float* dm = ThreadFloats(dm_buffer, kT * pass * o);
  float* du = ThreadFloats(du_buffer, kT * c * o);
  for (int64_t first = 0; first < grid.count; first += pass) {
    const int64_t count = std::min(pass, grid.count - first);
    InputTransform(x, c, grid, first, count, v);
    OutputTransformTranspose(dy, o, grid, first, count, dm);
    BatchedMatmul(kT, c, count, o, true, false, v, dm, du, g[15], first > 0);
  }
  KernelTransformTranspose(du, c, o, dw);
}

// x, kernel and y point at the three buffers of `direction` (one written, two read);
// `winograd` allows the Winograd algorithm where it applies.
ffi::Error Run(Direction direction, const Geometry& g, bool winograd, float* x, float* kernel,
               float* y) {
  try {
    omp_set_num_threads(static_cast<int>(g[15]));  // This calling thread's OpenMP teams only.
    if (winograd && WinogradApplies(g)) {
      if (direction == Direction::kKernelGradient) {
        WinogradKernelGradient(g, x, y, kernel);
      } else if (direction == Direction::kForward) {
        WinogradConvolution(g, false, x, kernel, y);
      } else {
        WinogradConvolution(g, true, y, kernel, x);
      }
      return ffi::Error::Success();
    }
    const Plan& plan = CachedPlan(direction, g);
    const Descriptors& d = plan.descriptors;
    dnnl::stream stream(CpuEngine());
    memory x_mem(d.x, CpuEngine(), x), y_mem(d.y, CpuEngine(), y);
    memory kernel_hwio(d.kernel_hwio, CpuEngine(), kernel);
    thread_local ThreadBuffer kernel_buffer, scratchpad_buffer, reorder_scratchpad_buffer;
    memory kernel_mem =
        plan.reorder_kernel ? ThreadMemory(plan.kernel_layout, kernel_buffer) : kernel_hwio;
    memory scratchpad = ThreadMemory(plan.scratchpad, scratchpad_buffer);
    auto reorder_kernel = [&](memory& from, memory& to) {
      memory reorder_scratchpad = ThreadMemory(plan.reorder_scratchpad, reorder_scratchpad_buffer);
      plan.kernel_reorder.execute(stream, {{DNNL_ARG_FROM, from}, {DNNL_ARG_TO, to},
                                           {DNNL_ARG_SCRATCHPAD, reorder_scratchpad}});
    };
    if (direction == Direction::kForward) {
      if (plan.reorder_kernel) reorder_kernel(kernel_hwio, kernel_mem);
      plan.convolution.execute(stream, {{DNNL_ARG_SRC, x_mem},
                                        {DNNL_ARG_WEIGHTS, kernel_mem},
                                        {DNNL_ARG_DST, y_mem},
                                        {DNNL_ARG_SCRATCHPAD, scratchpad}});
    } else if (direction == Direction::kInputGradient) {
      if (plan.reorder_kernel) reorder_kernel(kernel_hwio, kernel_mem);
      plan.convolution.execute(stream, {{DNNL_ARG_DIFF_SRC, x_mem},
                                        {DNNL_ARG_WEIGHTS, kernel_mem},
                                        {DNNL_ARG_DIFF_DST, y_mem},
                                        {DNNL_ARG_SCRATCHPAD, scratchpad}});
    } else {
      plan.convolution.execute(stream, {{DNNL_ARG_SRC, x_mem},
                                        {DNNL_ARG_DIFF_WEIGHTS, kernel_mem},
                                        {DNNL_ARG_DIFF_DST, y_mem},
                                        {DNNL_ARG_SCRATCHPAD, scratchpad}});
      if (plan.reorder_kernel) reorder_kernel(kernel_mem, kernel_hwio);
    }
    stream.wait();
  } catch (const std::exception& e) {
    return ffi::Error(ffi::ErrorCode::kInternal, std::string("oneDNN convolution: ") + e.what());
  }
  return ffi::Error::Success();
}

using Dims = ffi::Buffer<ffi::F32>::Dimensions;

Geometry MakeGeometry(Dims x, Dims kernel, Dims y, int64_t stride_h, int64_t stride_w,
                      int64_t pad_top, int64_t pad_bottom, int64_t pad_left, int64_t pad_right,
                      int64_t threads) {
  return Geometry{{x[0], x[1], x[2], x[3], kernel[0], kernel[1], kernel[3], y[1], y[2], stride_h,
                   stride_w, pad_top, pad_bottom, pad_left, pad_right, threads}};
}

ffi::Error Forward(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> kernel,
                   ffi::ResultBuffer<ffi::F32> y, int64_t stride_h, int64_t stride_w,
                   int64_t pad_top, int64_t pad_bottom, int64_t pad_left, int64_t pad_right,
                   int64_t threads, int64_t winograd) {
  const Geometry g = MakeGeometry(x.dimensions(), kernel.dimensions(), y->dimensions(), stride_h,
                                  stride_w, pad_top, pad_bottom, pad_left, pad_right, threads);
  return Run(Direction::kForward, g, winograd != 0, x.typed_data(), kernel.typed_data(),
             y->typed_data());
}

ffi::Error InputGradient(ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> kernel,
                         ffi::ResultBuffer<ffi::F32> dx, int64_t stride_h, int64_t stride_w,
                         int64_t pad_top, int64_t pad_bottom, int64_t pad_left, int64_t pad_right,
                         int64_t threads, int64_t winograd) {
  const Geometry g = MakeGeometry(dx->dimensions(), kernel.dimensions(), dy.dimensions(), stride_h,
                                  stride_w, pad_top, pad_bottom, pad_left, pad_right, threads);
  return Run(Direction::kInputGradient, g, winograd != 0, dx->typed_data(), kernel.typed_data(),
             dy.typed_data());
}

ffi::Error KernelGradient(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                          ffi::ResultBuffer<ffi::F32> dkernel, int64_t stride_h, int64_t stride_w,
                          int64_t pad_top, int64_t pad_bottom, int64_t pad_left, int64_t pad_right,
                          int64_t threads, int64_t winograd) {
  const Geometry g = MakeGeometry(x.dimensions(), dkernel->dimensions(), dy.dimensions(), stride_h,
                                  stride_w, pad_top, pad_bottom, pad_left, pad_right, threads);
  return Run(Direction::kKernelGradient, g, winograd != 0, x.typed_data(), dkernel->typed_data(),
             dy.typed_data());
}

}  // namespace

#define DJ_CONV_SIGNATURE                                                                     \
  ffi::Ffi::Bind()                                                                            \
      .Arg<ffi::Buffer<ffi::F32>>()                                                           \
      .Arg<ffi::Buffer<ffi::F32>>()                                                           \
      .Ret<ffi::Buffer<ffi::F32>>()                                                           \
      .Attr<int64_t>("stride_h")                                                              \
      .Attr<int64_t>("stride_w")                                                              \
      .Attr<int64_t>("pad_top")                                                               \
      .Attr<int64_t>("pad_bottom")                                                            \
      .Attr<int64_t>("pad_left")                                                              \
      .Attr<int64_t>("pad_right")                                                             \
      .Attr<int64_t>("threads")                                                               \
      .Attr<int64_t>("winograd")

XLA_FFI_DEFINE_HANDLER_SYMBOL(DjConvForward, Forward, DJ_CONV_SIGNATURE);
XLA_FFI_DEFINE_HANDLER_SYMBOL(DjConvInputGradient, InputGradient, DJ_CONV_SIGNATURE);
XLA_FFI_DEFINE_HANDLER_SYMBOL(DjConvKernelGradient, KernelGradient, DJ_CONV_SIGNATURE);
