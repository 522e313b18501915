// llm._C: the csrc/ norm kernels for torch tensors. The only file here that includes torch;
// it checks tensors, allocates outputs and hands raw pointers to the launchers in norms.h.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <vector>

#include "norms.h"

namespace {

llm::DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return llm::DType::kFloat32;
    case at::kHalf: return llm::DType::kFloat16;
    case at::kBFloat16: return llm::DType::kBFloat16;
    default: TORCH_CHECK(false, "llm._C norms take float32, float16 or bfloat16, not ", t.scalar_type());
  }
}

void check_rows(const at::Tensor& x) {
  TORCH_CHECK(x.is_cuda(), "llm._C norms need CUDA tensors");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "llm._C norms take a contiguous (rows, cols) tensor");
  TORCH_CHECK(x.size(1) <= llm::norm_max_cols(dtype_of(x)), "rows of ", x.size(1), " elements exceed the ",
              llm::norm_max_cols(dtype_of(x)), " the kernels keep in registers");
}

void check_like(const c10::optional<at::Tensor>& t, const at::Tensor& x, const char* name) {
  if (!t) return;
  TORCH_CHECK(t->is_cuda() && t->is_contiguous() && t->scalar_type() == x.scalar_type() && t->numel() == x.size(1),
              name, " must be a contiguous CUDA tensor of ", x.size(1), " elements in the input's dtype");
}

const void* ptr_or_null(const c10::optional<at::Tensor>& t) { return t ? t->data_ptr() : nullptr; }

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, what, " failed: ", cudaGetErrorString(err));
}

std::vector<at::Tensor> layer_norm_fwd(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                                       const c10::optional<at::Tensor>& bias, double eps) {
  check_rows(x);
  check_like(weight, x, "weight");
  check_like(bias, x, "bias");
  const c10::cuda::CUDAGuard guard(x.device());
  auto y = at::empty_like(x);
  auto mean = at::empty({x.size(0)}, x.options().dtype(at::kFloat));
  auto rstd = at::empty_like(mean);
  check_launch(llm::layer_norm_forward(dtype_of(x), x.data_ptr(), ptr_or_null(weight), ptr_or_null(bias), y.data_ptr(),
                                       mean.data_ptr<float>(), rstd.data_ptr<float>(), x.size(0), x.size(1),
                                       static_cast<float>(eps), c10::cuda::getCurrentCUDAStream()),
               "layer_norm_forward");
  return {y, mean, rstd};
}

// Returns dx, dweight, dbias (the last two undefined when weight / bias are absent).
std::vector<at::Tensor> layer_norm_bwd(const at::Tensor& dy, const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                                       bool has_bias, const at::Tensor& mean, const at::Tensor& rstd) {
  check_rows(x);
  check_like(weight, x, "weight");
  TORCH_CHECK(dy.sizes() == x.sizes() && dy.is_contiguous() && dy.scalar_type() == x.scalar_type(),
              "dy must match x in shape and dtype");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t partials = llm::norm_backward_partials(x.size(0), x.size(1), dtype_of(x));
  auto dx = at::empty_like(x);
  at::Tensor dweight, dbias, partial_dweight, partial_dbias;
  if (weight) {
    dweight = at::empty({x.size(1)}, x.options());
    partial_dweight = at::empty({partials, x.size(1)}, x.options().dtype(at::kFloat));
  }
  if (has_bias) {
    dbias = at::empty({x.size(1)}, x.options());
    partial_dbias = at::empty({partials, x.size(1)}, x.options().dtype(at::kFloat));
  }
  check_launch(
      llm::layer_norm_backward(dtype_of(x), x.data_ptr(), dy.data_ptr(), ptr_or_null(weight), mean.data_ptr<float>(),
                               rstd.data_ptr<float>(), dx.data_ptr(), weight ? dweight.data_ptr() : nullptr,
                               has_bias ? dbias.data_ptr() : nullptr,
                               weight ? partial_dweight.data_ptr<float>() : nullptr,
                               has_bias ? partial_dbias.data_ptr<float>() : nullptr, x.size(0), x.size(1),
                               c10::cuda::getCurrentCUDAStream()),
      "layer_norm_backward");
  return {dx, dweight, dbias};
}

std::vector<at::Tensor> rms_norm_fwd(const at::Tensor& x, const c10::optional<at::Tensor>& weight, double eps) {
  check_rows(x);
  check_like(weight, x, "weight");
  const c10::cuda::CUDAGuard guard(x.device());
  auto y = at::empty_like(x);
  auto rstd = at::empty({x.size(0)}, x.options().dtype(at::kFloat));
  check_launch(llm::rms_norm_forward(dtype_of(x), x.data_ptr(), ptr_or_null(weight), y.data_ptr(),
                                     rstd.data_ptr<float>(), x.size(0), x.size(1), static_cast<float>(eps),
                                     c10::cuda::getCurrentCUDAStream()),
               "rms_norm_forward");
  return {y, rstd};
}

std::vector<at::Tensor> rms_norm_bwd(const at::Tensor& dy, const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                                     const at::Tensor& rstd) {
  check_rows(x);
  check_like(weight, x, "weight");
  TORCH_CHECK(dy.sizes() == x.sizes() && dy.is_contiguous() && dy.scalar_type() == x.scalar_type(),
              "dy must match x in shape and dtype");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t partials = llm::norm_backward_partials(x.size(0), x.size(1), dtype_of(x));
  auto dx = at::empty_like(x);
  at::Tensor dweight, partial_dweight;
  if (weight) {
    dweight = at::empty({x.size(1)}, x.options());
    partial_dweight = at::empty({partials, x.size(1)}, x.options().dtype(at::kFloat));
  }
  check_launch(llm::rms_norm_backward(dtype_of(x), x.data_ptr(), dy.data_ptr(), ptr_or_null(weight),
                                      rstd.data_ptr<float>(), dx.data_ptr(), weight ? dweight.data_ptr() : nullptr,
                                      weight ? partial_dweight.data_ptr<float>() : nullptr, x.size(0), x.size(1),
                                      c10::cuda::getCurrentCUDAStream()),
               "rms_norm_backward");
  return {dx, dweight};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "llm CUDA kernels (csrc/): LayerNorm and RMSNorm forward and backward";
  m.def("layer_norm_fwd", &layer_norm_fwd, "LayerNorm forward -> (y, mean, rstd)");
  m.def("layer_norm_bwd", &layer_norm_bwd, "LayerNorm backward -> (dx, dweight, dbias)");
  m.def("rms_norm_fwd", &rms_norm_fwd, "RMSNorm forward -> (y, rstd)");
  m.def("rms_norm_bwd", &rms_norm_bwd, "RMSNorm backward -> (dx, dweight)");
}
