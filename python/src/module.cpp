// expertlink._C: the torch-free binding of the public C++ API.
//   - expertlink::Error -> expertlink._C.Error (a RuntimeError) with .code (an ErrorCode) and .message;
//   - TensorView from (data_ptr: int, dtype: str, shape, strides) — the caller keeps the memory alive;
//   - Communicator, Buffer, handles, argument structs (bind_buffer.cpp);
//   - the CPU oracle on numpy arrays (bind_reference.cpp), as expertlink._C.reference.
#include <cstring>

#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include "common.hpp"
#include "expertlink/tensor.hpp"

namespace expertlink::python {

DType parse_dtype(const std::string& name) {
  static const struct {
    const char* name;
    DType dtype;
  } kNames[] = {{"bf16", DType::kBF16},
                {"bfloat16", DType::kBF16},
                {"fp8_e4m3", DType::kFP8E4M3},
                {"float8_e4m3fn", DType::kFP8E4M3},
                {"f32", DType::kF32},
                {"float32", DType::kF32},
                {"i32", DType::kI32},
                {"int32", DType::kI32},
                {"i64", DType::kI64},
                {"int64", DType::kI64},
                {"u8", DType::kU8},
                {"uint8", DType::kU8},
                {"bool", DType::kBool}};
  for (const auto& n : kNames)
    if (name == n.name) return n.dtype;
  invalid("dtype '" + name + "' is not one of bf16, fp8_e4m3, f32, i32, i64, u8, bool");
}

namespace {

PyObject* g_error_type = nullptr;

TensorView make_view(uintptr_t data, const std::string& dtype, const std::vector<int64_t>& shape,
                     const std::vector<int64_t>& strides) {
  TensorView v;
  if (shape.empty() || shape.size() > size_t(TensorView::kMaxDims))
    invalid("a TensorView has 1 to " + std::to_string(TensorView::kMaxDims) + " dimensions, got " +
            std::to_string(shape.size()));
  if (!strides.empty() && strides.size() != shape.size())
    invalid(std::to_string(strides.size()) + " strides for " + std::to_string(shape.size()) + " dimensions");
  v.data = reinterpret_cast<void*>(data);
  v.dtype = parse_dtype(dtype);
  v.ndim = static_cast<int>(shape.size());
  int64_t st = 1;
  for (int k = v.ndim - 1; k >= 0; --k) {
    if (shape[k] < 0)
      invalid("shape[" + std::to_string(k) + "] = " + std::to_string(shape[k]) + " is negative");
    v.shape[k] = shape[k];
    v.stride[k] = strides.empty() ? st : strides[k];
    st *= shape[k];
  }
  if (data == 0 && v.numel() > 0)
    invalid("a TensorView of " + std::to_string(v.numel()) + " elements has data = 0");
  return v;
}

}  // namespace

void bind_tensor(nb::module_& m) {
  nb::enum_<DType>(m, "DType")
      .value("bf16", DType::kBF16)
      .value("fp8_e4m3", DType::kFP8E4M3)
      .value("f32", DType::kF32)
      .value("i32", DType::kI32)
      .value("i64", DType::kI64)
      .value("u8", DType::kU8)
      .value("bool", DType::kBool);

  nb::class_<TensorView>(
      m, "TensorView",
      "Non-owning view of device memory: data pointer (int), dtype name, shape, strides in "
      "elements (row-major when omitted). The caller keeps the memory alive.")
      .def(nb::init<>(), "An undefined view (the C++ API reads it as 'not given').")
      .def(
          "__init__",
          [](TensorView* self, uintptr_t data, const std::string& dtype, const std::vector<int64_t>& shape,
             const std::vector<int64_t>& strides) {
            new (self) TensorView(make_view(data, dtype, shape, strides));
          },
          nb::arg("data"), nb::arg("dtype"), nb::arg("shape"), nb::arg("strides") = std::vector<int64_t>{})
      .def_prop_ro("data", [](const TensorView& v) { return reinterpret_cast<uintptr_t>(v.data); })
      .def_prop_ro("dtype", [](const TensorView& v) { return std::string(dtype_name(v.dtype)); })
      .def_prop_ro("shape",
                   [](const TensorView& v) { return std::vector<int64_t>(v.shape, v.shape + v.ndim); })
      .def_prop_ro("strides",
                   [](const TensorView& v) { return std::vector<int64_t>(v.stride, v.stride + v.ndim); })
      .def_prop_ro("defined", &TensorView::defined)
      .def("numel", &TensorView::numel)
      .def("is_contiguous", &TensorView::is_contiguous)
      .def("rows_are_dense_16b", &TensorView::rows_are_dense_16b)
      .def("describe", &TensorView::describe)
      .def("__repr__", [](const TensorView& v) {
        return v.defined() ? "TensorView(" + v.describe() + ")" : std::string("TensorView(undefined)");
      });

  m.def("dtype_size", [](const std::string& dtype) { return dtype_size(parse_dtype(dtype)); });
}

}  // namespace expertlink::python

NB_MODULE(_C, m) {
  namespace nb = nanobind;
  using namespace expertlink;
  m.doc() = "ExpertLink's torch-free binding (raw device pointers, dtypes, shapes, strides, streams as ints)";

  nb::enum_<ErrorCode>(m, "ErrorCode")
      .value("invalid_argument", ErrorCode::kInvalidArgument)
      .value("cuda", ErrorCode::kCuda)
      .value("nccl", ErrorCode::kNccl)
      .value("timeout", ErrorCode::kTimeout)
      .value("unsupported", ErrorCode::kUnsupported)
      .value("internal", ErrorCode::kInternal);

  // expertlink.Error: a RuntimeError whose .code is the ErrorCode and .message the text without prefix.
  python::g_error_type = PyErr_NewExceptionWithDoc(
      "expertlink._C.Error", "The one error type of ExpertLink: .code (ErrorCode) and the message.",
      PyExc_RuntimeError, nullptr);
  m.attr("Error") = nb::handle(python::g_error_type);
  nb::register_exception_translator([](const std::exception_ptr& p, void*) {
    try {
      std::rethrow_exception(p);
    } catch (const Error& e) {
      nb::object exc = nb::borrow(python::g_error_type)(nb::str(e.what()));
      exc.attr("code") = nb::cast(e.code());
      PyErr_SetObject(python::g_error_type, exc.ptr());
    }
  });

  m.def("error_code_name", [](ErrorCode c) { return std::string(error_code_name(c)); });
  m.def(
      "_raise_for_test", [](ErrorCode c, const std::string& message) { throw Error(c, message); },
      "Raises expertlink::Error(code, message) from C++ (tests the translation).");

  python::bind_tensor(m);
  python::bind_buffer(m);
  nb::module_ ref =
      m.def_submodule("reference", "The CPU oracle (include/expertlink/reference.hpp) on numpy");
  python::bind_reference(ref);
}
