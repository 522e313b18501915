// LayerNorm and RMSNorm on raw device pointers: no torch here, so this compiles with nvcc alone.
//
// Rows are contiguous, `cols` elements each; x, y, weight, bias, dy, dx share one dtype.
// mean / rstd are fp32 per row (mean is unused by RMSNorm and may be null). weight and
// bias may be null. RMSNorm rounds the normalised row to the dtype before the weight,
// as LLaMA does. Every function returns the launch's cudaError_t.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace llm {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Widest row the kernels take (a row is kept in registers): 8192 elements; rows whose
// length or pointers rule out 16-byte vectors fit up to 4096.
int64_t norm_max_cols(DType dtype);

cudaError_t layer_norm_forward(DType dtype, const void* x, const void* weight, const void* bias, void* y, float* mean,
                               float* rstd, int64_t rows, int64_t cols, float eps, cudaStream_t stream);
cudaError_t rms_norm_forward(DType dtype, const void* x, const void* weight, void* y, float* rstd, int64_t rows,
                             int64_t cols, float eps, cudaStream_t stream);

// Rows of the fp32 scratch buffers (partial weight / bias gradients, `cols` wide) that the
// backward pass needs; each block of the backward kernel sums its rows' gradients into one.
int64_t norm_backward_partials(int64_t rows, int64_t cols, DType dtype);

// dweight / dbias (may be null) receive the reduced gradients in `dtype`.
cudaError_t layer_norm_backward(DType dtype, const void* x, const void* dy, const void* weight, const float* mean,
                                const float* rstd, void* dx, void* dweight, void* dbias, float* partial_dweight,
                                float* partial_dbias, int64_t rows, int64_t cols, cudaStream_t stream);
cudaError_t rms_norm_backward(DType dtype, const void* x, const void* dy, const void* weight, const float* rstd,
                              void* dx, void* dweight, float* partial_dweight, int64_t rows, int64_t cols,
                              cudaStream_t stream);

}  // namespace llm
