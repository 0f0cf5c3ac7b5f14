// A non-owning view of a device tensor: pointer, dtype, shape and strides (in elements). The C++ API takes
// and returns these; the caller owns the memory (raw cudaMalloc, torch, anything).
#pragma once

#include <cstdint>
#include <initializer_list>
#include <string>

namespace expertlink {

enum class DType : uint8_t { kBF16, kFP8E4M3, kF32, kI32, kI64, kU8, kBool };

const char* dtype_name(DType dtype);
int dtype_size(DType dtype);

struct TensorView {
  static constexpr int kMaxDims = 4;

  void* data = nullptr;
  DType dtype = DType::kU8;
  int ndim = 0;
  int64_t shape[kMaxDims] = {};
  int64_t stride[kMaxDims] = {};  // elements

  TensorView() = default;
  // Row-major contiguous view.
  TensorView(void* data, DType dtype, std::initializer_list<int64_t> shape);
  TensorView(void* data, DType dtype, std::initializer_list<int64_t> shape,
             std::initializer_list<int64_t> stride);

  bool defined() const { return ndim > 0; }  // a default-constructed view means "not given"
  int64_t numel() const;
  int64_t size(int dim) const { return shape[dim]; }
  bool is_contiguous() const;
  // Innermost dimension contiguous, rows 16-byte aligned: what the copy kernels need for the row data.
  bool rows_are_dense_16b() const;
  std::string describe() const;  // "bf16[4096, 7168] strides [7168, 1]"
  template <typename T>
  T* ptr() const {
    return static_cast<T*>(data);
  }
};

}  // namespace expertlink
