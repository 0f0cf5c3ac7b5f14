#include "expertlink/tensor.hpp"

#include "check.hpp"

namespace expertlink {

const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::kBF16:
      return "bf16";
    case DType::kFP8E4M3:
      return "fp8_e4m3";
    case DType::kF32:
      return "f32";
    case DType::kI32:
      return "i32";
    case DType::kI64:
      return "i64";
    case DType::kU8:
      return "u8";
    case DType::kBool:
      return "bool";
  }
  return "?";
}

int dtype_size(DType dtype) {
  switch (dtype) {
    case DType::kBF16:
      return 2;
    case DType::kF32:
    case DType::kI32:
      return 4;
    case DType::kI64:
      return 8;
    default:
      return 1;
  }
}

TensorView::TensorView(void* p, DType t, std::initializer_list<int64_t> dims) : data(p), dtype(t) {
  EL_CHECK(dims.size() <= size_t(kMaxDims), "a TensorView has at most %d dimensions, got %zu", kMaxDims,
           dims.size());
  ndim = static_cast<int>(dims.size());
  int i = 0;
  for (int64_t d : dims) shape[i++] = d;
  int64_t st = 1;
  for (int k = ndim - 1; k >= 0; --k) {
    stride[k] = st;
    st *= shape[k];
  }
}

TensorView::TensorView(void* p, DType t, std::initializer_list<int64_t> dims,
                       std::initializer_list<int64_t> strides)
    : TensorView(p, t, dims) {
  EL_CHECK(strides.size() == dims.size(), "%zu strides for %zu dimensions", strides.size(), dims.size());
  int i = 0;
  for (int64_t s : strides) stride[i++] = s;
}

int64_t TensorView::numel() const {
  int64_t n = 1;
  for (int i = 0; i < ndim; ++i) n *= shape[i];
  return n;
}

bool TensorView::is_contiguous() const {
  int64_t st = 1;
  for (int k = ndim - 1; k >= 0; --k) {
    if (shape[k] != 1 && stride[k] != st) return false;
    st *= shape[k];
  }
  return true;
}

bool TensorView::rows_are_dense_16b() const {
  if (ndim != 2) return false;
  const int64_t es = dtype_size(dtype);
  if (shape[1] > 1 && stride[1] != 1) return false;
  if ((shape[1] * es) % 16 != 0) return false;
  if (reinterpret_cast<uintptr_t>(data) % 16 != 0) return false;
  return shape[0] <= 1 || (stride[0] * es) % 16 == 0;
}

std::string TensorView::describe() const {
  std::string s = std::string(dtype_name(dtype)) + "[";
  for (int i = 0; i < ndim; ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  s += "] strides [";
  for (int i = 0; i < ndim; ++i) s += (i ? ", " : "") + std::to_string(stride[i]);
  return s + "]";
}

}  // namespace expertlink
