// Check macros of the host runtime. Each throws expertlink::Error with file:line and a formatted message.
#pragma once

#include <cstdio>
#include <string>

#include <cuda_runtime.h>
#include <nccl.h>

#include "expertlink/error.hpp"

namespace expertlink::detail {

template <typename... Args>
std::string format(const char* fmt, Args... args) {
  if constexpr (sizeof...(Args) == 0) {
    return fmt;
  } else {
    int n = std::snprintf(nullptr, 0, fmt, args...);
    std::string s(static_cast<size_t>(n > 0 ? n : 0), '\0');
    std::snprintf(s.data(), s.size() + 1, fmt, args...);
    return s;
  }
}

[[noreturn]] void raise(ErrorCode code, const char* file, int line, const std::string& message);

}  // namespace expertlink::detail

#define EL_FAIL(code, ...) \
  ::expertlink::detail::raise((code), __FILE__, __LINE__, ::expertlink::detail::format(__VA_ARGS__))

// Argument validation: the message must name the argument and the offending value.
#define EL_CHECK(cond, ...)                                                       \
  do {                                                                            \
    if (!(cond)) EL_FAIL(::expertlink::ErrorCode::kInvalidArgument, __VA_ARGS__); \
  } while (0)

#define EL_CUDA_CHECK(expr)                                                                             \
  do {                                                                                                  \
    cudaError_t el_err_ = (expr);                                                                       \
    if (el_err_ != cudaSuccess)                                                                         \
      EL_FAIL(::expertlink::ErrorCode::kCuda, "%s failed: %s (%s)", #expr, cudaGetErrorString(el_err_), \
              cudaGetErrorName(el_err_));                                                               \
  } while (0)

#define EL_NCCL_CHECK(expr)                                                                            \
  do {                                                                                                 \
    ncclResult_t el_res_ = (expr);                                                                     \
    if (el_res_ != ncclSuccess)                                                                        \
      EL_FAIL(::expertlink::ErrorCode::kNccl, "%s failed: %s%s%s", #expr, ncclGetErrorString(el_res_), \
              " / last NCCL error: ", ncclGetLastError(nullptr));                                      \
  } while (0)
