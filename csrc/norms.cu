// LayerNorm / RMSNorm forward and backward (see norms.h).
//
// A "row group" of threads owns one row: a single warp when the row is short (several
// rows per block, warp shuffles only), the whole block when it is long (shuffles, then
// shared memory across warps). Each thread keeps ITERS vectors of VEC elements of the
// row in registers, so the input is read once; loads are 16-byte vectors when the row
// length and pointers allow it. The backward pass lets each row group walk a stride of
// rows, accumulating its weight/bias gradient in registers, and writes one partial row;
// a small column-sum kernel reduces the partials.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <initializer_list>

#include "norms.h"

namespace llm {
namespace {

constexpr int kWarp = 32;
constexpr int kMaxWarpIters = 4;    // warp per row up to 32 * VEC * 4 elements
constexpr int kMaxBlockIters = 8;   // block per row up to 1024 * VEC * 8 elements
constexpr int kMaxThreads = 1024;
constexpr int kWarpRowsPerBlock = 4;
// The backward pass keeps five fp32 values per element in registers; rows up to this
// many elements fit one block (rows that cannot be vectorized: half as many).
constexpr int64_t kMaxCols = 8192;

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

// Explicit conversions: torch builds with __CUDA_NO_HALF_CONVERSIONS__ and friends.
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sum over the threads that own a row: the warp, or the whole block (`group_size` is the
// same for every thread of a launch, so the barriers are reached by all or none).
__device__ __forceinline__ float row_sum(float v, int group_size) {
  v = warp_sum(v);
  if (group_size > kWarp) {
    __shared__ float partial[kMaxThreads / kWarp];
    const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
    __syncthreads();  // the previous call's readers are done with `partial`
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    v = lane < static_cast<int>(blockDim.x / kWarp) ? partial[lane] : 0.f;
    v = warp_sum(v);
  }
  return v;
}

template <typename T, int VEC>
__device__ __forceinline__ void load(const T* p, float* out) {
  Pack<T, VEC> pack = *reinterpret_cast<const Pack<T, VEC>*>(p);
#pragma unroll
  for (int j = 0; j < VEC; ++j) out[j] = to_float(pack.v[j]);
}

template <typename T, int VEC>
__device__ __forceinline__ void store(T* p, const float* in) {
  Pack<T, VEC> pack;
#pragma unroll
  for (int j = 0; j < VEC; ++j) pack.v[j] = from_float<T>(in[j]);
  *reinterpret_cast<Pack<T, VEC>*>(p) = pack;
}

// The row group of this thread: `size` threads (a warp, or the whole block) share a row.
// `row` is the group's first row, `tid` the thread's index in it, `count` the groups in the grid.
struct RowGroup {
  int64_t row;
  int tid;
  int size;
  int64_t count;
  __device__ explicit RowGroup(int group_size) : size(group_size) {
    const int per_block = blockDim.x / group_size;
    row = static_cast<int64_t>(blockIdx.x) * per_block + threadIdx.x / group_size;
    tid = threadIdx.x % group_size;
    count = static_cast<int64_t>(gridDim.x) * per_block;
  }
};

template <typename T, int VEC, int ITERS>
__global__ void norm_forward_kernel(const T* __restrict__ x, const T* __restrict__ weight, const T* __restrict__ bias,
                                    T* __restrict__ y, float* __restrict__ mean_out, float* __restrict__ rstd_out,
                                    int64_t rows, int cols, float eps, bool rms, int group_size) {
  const RowGroup group(group_size);
  if (group.row >= rows) return;  // a whole row group leaves together
  const T* xr = x + group.row * cols;
  float v[ITERS][VEC];
  float sum = 0.f;
#pragma unroll
  for (int i = 0; i < ITERS; ++i) {
    const int c = (i * group.size + group.tid) * VEC;
    if (c < cols) {
      load<T, VEC>(xr + c, v[i]);
#pragma unroll
      for (int j = 0; j < VEC; ++j) sum += v[i][j];
    }
  }
  const float mean = rms ? 0.f : row_sum(sum, group.size) / cols;
  float squares = 0.f;
#pragma unroll
  for (int i = 0; i < ITERS; ++i) {
    const int c = (i * group.size + group.tid) * VEC;
    if (c < cols) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) squares += (v[i][j] - mean) * (v[i][j] - mean);
    }
  }
  const float rstd = rsqrtf(row_sum(squares, group.size) / cols + eps);
  T* yr = y + group.row * cols;
#pragma unroll
  for (int i = 0; i < ITERS; ++i) {
    const int c = (i * group.size + group.tid) * VEC;
    if (c < cols) {
      float w[VEC], b[VEC], out[VEC];
      if (weight) load<T, VEC>(weight + c, w);
      if (bias) load<T, VEC>(bias + c, b);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        float n = (v[i][j] - mean) * rstd;
        if (rms) n = to_float(from_float<T>(n));
        if (weight) n *= w[j];
        if (bias) n += b[j];
        out[j] = n;
      }
      store<T, VEC>(yr + c, out);
    }
  }
  if (group.tid == 0) {
    if (mean_out) mean_out[group.row] = mean;
    rstd_out[group.row] = rstd;
  }
}

template <typename T, int VEC, int ITERS>
__global__ void norm_backward_kernel(const T* __restrict__ x, const T* __restrict__ dy, const T* __restrict__ weight,
                                     const float* __restrict__ mean, const float* __restrict__ rstd, T* __restrict__ dx,
                                     float* __restrict__ partial_dweight, float* __restrict__ partial_dbias,
                                     int64_t rows, int cols, bool rms, int group_size) {
  const RowGroup group(group_size);
  float w[ITERS][VEC], dw[ITERS][VEC], db[ITERS][VEC];
#pragma unroll
  for (int i = 0; i < ITERS; ++i) {
    const int c = (i * group.size + group.tid) * VEC;
#pragma unroll
    for (int j = 0; j < VEC; ++j) w[i][j] = 1.f, dw[i][j] = 0.f, db[i][j] = 0.f;
    if (weight && c < cols) load<T, VEC>(weight + c, w[i]);
  }
  // Block per row: every thread of the block walks the same rows (row_sum synchronises).
  for (int64_t row = group.row; row < rows; row += group.count) {
    const float mu = rms ? 0.f : mean[row];
    const float rs = rstd[row];
    float xhat[ITERS][VEC], g[ITERS][VEC];
    float sum_xhat_wdy = 0.f, sum_wdy = 0.f;
#pragma unroll
    for (int i = 0; i < ITERS; ++i) {
      const int c = (i * group.size + group.tid) * VEC;
      if (c < cols) {
        float xv[VEC];
        load<T, VEC>(x + row * cols + c, xv);
        load<T, VEC>(dy + row * cols + c, g[i]);
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          xhat[i][j] = (xv[j] - mu) * rs;
          const float y_normed = rms ? to_float(from_float<T>(xhat[i][j])) : xhat[i][j];
          dw[i][j] += g[i][j] * y_normed;
          db[i][j] += g[i][j];
          g[i][j] *= w[i][j];
          sum_xhat_wdy += xhat[i][j] * g[i][j];
          sum_wdy += g[i][j];
        }
      }
    }
    const float c1 = row_sum(sum_xhat_wdy, group.size) / cols;
    const float c2 = rms ? 0.f : row_sum(sum_wdy, group.size) / cols;
#pragma unroll
    for (int i = 0; i < ITERS; ++i) {
      const int c = (i * group.size + group.tid) * VEC;
      if (c < cols) {
        float out[VEC];
#pragma unroll
        for (int j = 0; j < VEC; ++j) out[j] = (g[i][j] - (xhat[i][j] * c1 + c2)) * rs;
        store<T, VEC>(dx + row * cols + c, out);
      }
    }
  }
  // Groups that got no rows write zeros: every partial row is defined.
#pragma unroll
  for (int i = 0; i < ITERS; ++i) {
    const int c = (i * group.size + group.tid) * VEC;
    if (c < cols) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        if (partial_dweight) partial_dweight[group.row * cols + c + j] = dw[i][j];
        if (partial_dbias) partial_dbias[group.row * cols + c + j] = db[i][j];
      }
    }
  }
}

// out[c] = sum over p of partial[p][c]; 32 columns per block, 8 threads down each column.
template <typename T>
__global__ void column_sum_kernel(const float* __restrict__ partial, int64_t n_partial, int cols, T* __restrict__ out) {
  __shared__ float tile[8][kWarp + 1];
  const int c = blockIdx.x * kWarp + threadIdx.x;
  float s = 0.f;
  if (c < cols)
    for (int64_t p = threadIdx.y; p < n_partial; p += 8) s += partial[p * cols + c];
  tile[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && c < cols) {
    for (int k = 1; k < 8; ++k) s += tile[k][threadIdx.x];
    out[c] = from_float<T>(s);
  }
}

// How a row is split: vector width, vectors per thread, threads per row.
struct Plan {
  int vec;
  int iters;
  int threads;  // per row; kWarp means a warp per row
  bool ok;
};

int next_pow2(int64_t n) {
  int p = 1;
  while (p < n) p <<= 1;
  return p;
}

// `per_thread`: vectors each thread of a block-per-row plan aims at (the backward pass
// keeps five values per element in registers, so it takes fewer and more threads).
Plan make_plan(int64_t cols, int vec, int per_thread) {
  const int64_t vectors = (cols + vec - 1) / vec;
  if (vectors <= kWarp * kMaxWarpIters) return {vec, next_pow2((vectors + kWarp - 1) / kWarp), kWarp, true};
  int threads = next_pow2((vectors + per_thread - 1) / per_thread);
  if (threads > kMaxThreads) threads = kMaxThreads;
  const int iters = next_pow2((vectors + threads - 1) / threads);
  return {vec, iters, threads, iters <= kMaxBlockIters};
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

template <typename T>
Plan plan_for(int64_t cols, int per_thread, std::initializer_list<const void*> pointers) {
  constexpr int wide = 16 / sizeof(T);
  bool vectorize = cols % wide == 0;
  for (const void* p : pointers) vectorize = vectorize && (p == nullptr || aligned16(p));
  return make_plan(cols, vectorize ? wide : 1, per_thread);
}

int sm_count() {
  int device = 0, count = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device);
  return count > 0 ? count : 1;
}

// Row groups in the backward grid, each writing one partial gradient row; a multiple of
// the warp-per-row group count, so either plan fills whole blocks. Short rows (a warp
// each, small blocks) take more blocks per SM to keep it busy than long rows do.
int64_t partial_rows(int64_t rows, int64_t cols) {
  const int64_t per_sm = cols <= 1024 ? 8 : 2;
  int64_t blocks = per_sm * sm_count();
  const int64_t needed = (rows + kWarpRowsPerBlock - 1) / kWarpRowsPerBlock;
  if (blocks > needed) blocks = needed;
  return (blocks < 1 ? 1 : blocks) * kWarpRowsPerBlock;
}

// Calls f.template operator()<VEC, ITERS>() for the plan's compile-time shape.
template <int VEC, typename F>
cudaError_t with_iters(const Plan& plan, const F& f) {
  switch (plan.iters) {
    case 1: return f.template operator()<VEC, 1>();
    case 2: return f.template operator()<VEC, 2>();
    case 4: return f.template operator()<VEC, 4>();
    case 8: return f.template operator()<VEC, 8>();
  }
  return cudaErrorInvalidValue;
}

template <typename T, typename F>
cudaError_t dispatch_plan(const Plan& plan, const F& f) {
  if (!plan.ok) return cudaErrorInvalidValue;
  if (plan.vec == 1) return with_iters<1>(plan, f);
  return with_iters<16 / sizeof(T)>(plan, f);
}

// Row groups per block and the block size for a plan.
dim3 block_of(const Plan& plan) { return dim3(plan.threads == kWarp ? kWarp * kWarpRowsPerBlock : plan.threads); }
int rows_per_block(const Plan& plan) { return plan.threads == kWarp ? kWarpRowsPerBlock : 1; }

// cudaErrorLaunchOutOfResources when the kernel's registers do not allow `block` threads.
template <typename Kernel>
cudaError_t fits_registers(Kernel kernel, dim3 block) {
  cudaFuncAttributes attr;
  const cudaError_t err = cudaFuncGetAttributes(&attr, kernel);
  if (err != cudaSuccess) return err;
  return attr.maxThreadsPerBlock >= static_cast<int>(block.x) ? cudaSuccess : cudaErrorLaunchOutOfResources;
}

// Launch with the plan; where its block is too large for the kernel's registers, try half
// the threads with twice the vectors each (a block-per-row plan only).
template <typename T, typename MakeLaunch>
cudaError_t launch_fitting(Plan plan, MakeLaunch make_launch) {
  cudaError_t err = dispatch_plan<T>(plan, make_launch(plan));
  while (err == cudaErrorLaunchOutOfResources && plan.threads > 2 * kWarp && plan.iters < kMaxBlockIters) {
    plan.threads /= 2;
    plan.iters *= 2;
    err = dispatch_plan<T>(plan, make_launch(plan));
  }
  return err;
}

template <typename T>
struct ForwardLaunch {
  const void *x, *weight, *bias;
  void* y;
  float *mean, *rstd;
  int64_t rows;
  int cols;
  float eps;
  bool rms;
  dim3 grid, block;
  int group_size;
  cudaStream_t stream;

  template <int VEC, int ITERS>
  cudaError_t operator()() const {
    const cudaError_t fits = fits_registers(norm_forward_kernel<T, VEC, ITERS>, block);
    if (fits != cudaSuccess) return fits;
    norm_forward_kernel<T, VEC, ITERS><<<grid, block, 0, stream>>>(
        static_cast<const T*>(x), static_cast<const T*>(weight), static_cast<const T*>(bias), static_cast<T*>(y),
        mean, rstd, rows, cols, eps, rms, group_size);
    return cudaGetLastError();
  }
};

template <typename T>
struct BackwardLaunch {
  const void *x, *dy, *weight;
  const float *mean, *rstd;
  void* dx;
  float *partial_dweight, *partial_dbias;
  int64_t rows;
  int cols;
  bool rms;
  dim3 grid, block;
  int group_size;
  cudaStream_t stream;

  template <int VEC, int ITERS>
  cudaError_t operator()() const {
    const cudaError_t fits = fits_registers(norm_backward_kernel<T, VEC, ITERS>, block);
    if (fits != cudaSuccess) return fits;
    norm_backward_kernel<T, VEC, ITERS><<<grid, block, 0, stream>>>(
        static_cast<const T*>(x), static_cast<const T*>(dy), static_cast<const T*>(weight), mean, rstd,
        static_cast<T*>(dx), partial_dweight, partial_dbias, rows, cols, rms, group_size);
    return cudaGetLastError();
  }
};

template <typename T>
cudaError_t forward(const void* x, const void* weight, const void* bias, void* y, float* mean, float* rstd, int64_t rows,
                    int64_t cols, float eps, bool rms, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  const Plan plan = plan_for<T>(cols, 4, {x, weight, bias, y});
  const dim3 grid((rows + rows_per_block(plan) - 1) / rows_per_block(plan));
  return launch_fitting<T>(plan, [&](const Plan& p) {
    return ForwardLaunch<T>{x,   weight, bias, y,           mean,      rstd,  rows, static_cast<int>(cols),
                            eps, rms,    grid, block_of(p), p.threads, stream};
  });
}

template <typename T>
cudaError_t backward(const void* x, const void* dy, const void* weight, const float* mean, const float* rstd, void* dx,
                     void* dweight, void* dbias, float* partial_dweight, float* partial_dbias, int64_t rows,
                     int64_t cols, bool rms, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  const Plan plan = plan_for<T>(cols, 2, {x, dy, weight, dx});
  const int64_t partials = partial_rows(rows, cols);
  const dim3 grid(partials / rows_per_block(plan));
  cudaError_t err = launch_fitting<T>(plan, [&](const Plan& p) {
    return BackwardLaunch<T>{x,
                             dy,
                             weight,
                             mean,
                             rstd,
                             dx,
                             dweight ? partial_dweight : nullptr,
                             dbias ? partial_dbias : nullptr,
                             rows,
                             static_cast<int>(cols),
                             rms,
                             grid,
                             block_of(p),
                             p.threads,
                             stream};
  });
  if (err != cudaSuccess) return err;
  const dim3 sum_grid((cols + kWarp - 1) / kWarp), sum_block(kWarp, 8);
  if (dweight)
    column_sum_kernel<T><<<sum_grid, sum_block, 0, stream>>>(partial_dweight, partials, cols, static_cast<T*>(dweight));
  if (dbias)
    column_sum_kernel<T><<<sum_grid, sum_block, 0, stream>>>(partial_dbias, partials, cols, static_cast<T*>(dbias));
  return cudaGetLastError();
}

}  // namespace

int64_t norm_max_cols(DType) { return kMaxCols; }

int64_t norm_backward_partials(int64_t rows, int64_t cols, DType) { return partial_rows(rows, cols); }

#define LLM_DISPATCH_DTYPE(dtype, FN, ...)                                      \
  switch (dtype) {                                                              \
    case DType::kFloat32: return FN<float>(__VA_ARGS__);                        \
    case DType::kFloat16: return FN<__half>(__VA_ARGS__);                       \
    case DType::kBFloat16: return FN<__nv_bfloat16>(__VA_ARGS__);               \
  }                                                                             \
  return cudaErrorInvalidValue;

cudaError_t layer_norm_forward(DType dtype, const void* x, const void* weight, const void* bias, void* y, float* mean,
                               float* rstd, int64_t rows, int64_t cols, float eps, cudaStream_t stream) {
  LLM_DISPATCH_DTYPE(dtype, forward, x, weight, bias, y, mean, rstd, rows, cols, eps, false, stream)
}

cudaError_t rms_norm_forward(DType dtype, const void* x, const void* weight, void* y, float* rstd, int64_t rows,
                             int64_t cols, float eps, cudaStream_t stream) {
  LLM_DISPATCH_DTYPE(dtype, forward, x, weight, nullptr, y, nullptr, rstd, rows, cols, eps, true, stream)
}

cudaError_t layer_norm_backward(DType dtype, const void* x, const void* dy, const void* weight, const float* mean,
                                const float* rstd, void* dx, void* dweight, void* dbias, float* partial_dweight,
                                float* partial_dbias, int64_t rows, int64_t cols, cudaStream_t stream) {
  LLM_DISPATCH_DTYPE(dtype, backward, x, dy, weight, mean, rstd, dx, dweight, dbias, partial_dweight, partial_dbias,
                     rows, cols, false, stream)
}

cudaError_t rms_norm_backward(DType dtype, const void* x, const void* dy, const void* weight, const float* rstd,
                              void* dx, void* dweight, float* partial_dweight, int64_t rows, int64_t cols,
                              cudaStream_t stream) {
  LLM_DISPATCH_DTYPE(dtype, backward, x, dy, weight, nullptr, rstd, dx, dweight, nullptr, partial_dweight, nullptr,
                     rows, cols, true, stream)
}

}  // namespace llm
