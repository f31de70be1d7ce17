// 2-D convolutions for XLA:CPU as FFI custom calls backed by oneDNN (diffusion_jax/onednn_conv.py).
//
// Layouts are the U-Net's: activations NHWC, kernels HWIO, float32. Three targets, one per
// direction: forward y = x * w, the input gradient dx from (dy, w) and the kernel gradient dw from
// (x, dy). Each call runs oneDNN's primitive for its geometry on `threads` OpenMP threads; the
// primitive (and the reorder of the kernel to or from oneDNN's blocked layout) is created once per
// geometry and thread count and then reused.
#include <omp.h>

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

// x, kernel and y point at the three buffers of `direction` (one written, two read).
ffi::Error Run(Direction direction, const Geometry& g, float* x, float* kernel, float* y) {
  try {
    omp_set_num_threads(static_cast<int>(g[15]));  // This calling thread's OpenMP teams only.
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
                   int64_t threads) {
  const Geometry g = MakeGeometry(x.dimensions(), kernel.dimensions(), y->dimensions(), stride_h,
                                  stride_w, pad_top, pad_bottom, pad_left, pad_right, threads);
  return Run(Direction::kForward, g, x.typed_data(), kernel.typed_data(), y->typed_data());
}

ffi::Error InputGradient(ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> kernel,
                         ffi::ResultBuffer<ffi::F32> dx, int64_t stride_h, int64_t stride_w,
                         int64_t pad_top, int64_t pad_bottom, int64_t pad_left, int64_t pad_right,
                         int64_t threads) {
  const Geometry g = MakeGeometry(dx->dimensions(), kernel.dimensions(), dy.dimensions(), stride_h,
                                  stride_w, pad_top, pad_bottom, pad_left, pad_right, threads);
  return Run(Direction::kInputGradient, g, dx->typed_data(), kernel.typed_data(), dy.typed_data());
}

ffi::Error KernelGradient(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                          ffi::ResultBuffer<ffi::F32> dkernel, int64_t stride_h, int64_t stride_w,
                          int64_t pad_top, int64_t pad_bottom, int64_t pad_left, int64_t pad_right,
                          int64_t threads) {
  const Geometry g = MakeGeometry(x.dimensions(), dkernel->dimensions(), dy.dimensions(), stride_h,
                                  stride_w, pad_top, pad_bottom, pad_left, pad_right, threads);
  return Run(Direction::kKernelGradient, g, x.typed_data(), dkernel->typed_data(), dy.typed_data());
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
      .Attr<int64_t>("threads")

XLA_FFI_DEFINE_HANDLER_SYMBOL(DjConvForward, Forward, DJ_CONV_SIGNATURE);
XLA_FFI_DEFINE_HANDLER_SYMBOL(DjConvInputGradient, InputGradient, DJ_CONV_SIGNATURE);
XLA_FFI_DEFINE_HANDLER_SYMBOL(DjConvKernelGradient, KernelGradient, DJ_CONV_SIGNATURE);
