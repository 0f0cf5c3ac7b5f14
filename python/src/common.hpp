// Shared by the binding's translation units: the public headers, nanobind, and small helpers. The binding
// includes only include/expertlink (no src/ internals, no torch).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>

#include "expertlink/error.hpp"
#include "expertlink/tensor.hpp"

namespace expertlink::python {

namespace nb = nanobind;

// Raises expertlink.Error(kInvalidArgument) from binding-side checks, so Python sees one error type.
[[noreturn]] inline void invalid(const std::string& message) {
  throw Error(ErrorCode::kInvalidArgument, message);
}

// A dtype from its name as Python gives it ("bf16" / "bfloat16", "fp8_e4m3" / "float8_e4m3fn", ...).
DType parse_dtype(const std::string& name);

void bind_tensor(nb::module_& m);
void bind_buffer(nb::module_& m);
void bind_reference(nb::module_& m);

}  // namespace expertlink::python
