// The CPU oracle (include/expertlink/reference.hpp) on numpy arrays, as expertlink._C.reference. Vector
// fields are exposed as flat (row-major) numpy copies and set from any array of the right dtype (flattened);
// shapes are the ones reference.hpp documents. BF16 values are uint16 bit patterns, FP8 e4m3 uint8.
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include "common.hpp"
#include "expertlink/reference.hpp"

namespace expertlink::python {
namespace {

namespace ref = expertlink::reference;

template <class T>
using In = nb::ndarray<const T, nb::c_contig, nb::device::cpu>;
template <class T>
using Out = nb::ndarray<nb::numpy, T>;

template <class T>
std::vector<T> to_vec(const In<T>& a) {
  return std::vector<T>(a.data(), a.data() + a.size());
}

template <class T>
Out<T> to_np(std::vector<T> v, std::vector<size_t> shape) {
  auto* heap = new std::vector<T>(std::move(v));
  nb::capsule owner(heap, [](void* p) noexcept { delete static_cast<std::vector<T>*>(p); });
  return Out<T>(heap->data(), shape.size(), shape.data(), owner);
}

template <class T>
Out<T> flat(const std::vector<T>& v) {
  return to_np<T>(v, {v.size()});
}

template <class T>
std::vector<size_t> shape_of(const In<T>& a) {
  std::vector<size_t> s(a.ndim());
  for (size_t i = 0; i < a.ndim(); ++i) s[i] = a.shape(i);
  return s;
}

// Read-write numpy property for a std::vector member.
template <class C, class T>
void vec_rw(nb::class_<C>& cls, const char* name, std::vector<T> C::*f) {
  cls.def_prop_rw(
      name, [f](const C& c) { return flat(c.*f); }, [f](C& c, const In<T>& a) { c.*f = to_vec(a); },
      nb::rv_policy::move);
}

// Elementwise conversion of an array of any shape.
template <class From, class To, To (*F)(From)>
Out<To> map(const In<From>& a) {
  std::vector<To> out(a.size());
  for (size_t i = 0; i < a.size(); ++i) out[i] = F(a.data()[i]);
  return to_np<To>(std::move(out), shape_of(a));
}

template <class T>
int64_t rows_of(const In<T>& a, int64_t cols, const char* what) {
  if (a.ndim() != 2) invalid(std::string(what) + " must be 2-D, got " + std::to_string(a.ndim()) + "-D");
  if (cols >= 0 && int64_t(a.shape(1)) != cols)
    invalid(std::string(what) + " has " + std::to_string(a.shape(1)) + " columns, expected " +
            std::to_string(cols));
  return int64_t(a.shape(0));
}

void bind_numerics(nb::module_& m) {
  m.def("bf16_to_float", &map<uint16_t, float, ref::bf16_to_float>, "uint16 bit patterns -> float32 (exact)");
  m.def("float_to_bf16", &map<float, uint16_t, ref::float_to_bf16>,
        "float32 -> uint16 (RNE, as __float2bfloat16)");
  m.def("float_to_e4m3", &map<float, uint8_t, ref::float_to_e4m3>, "float32 -> uint8 (RNE, SATFINITE)");
  m.def("e4m3_to_float", &map<uint8_t, float, ref::e4m3_to_float>, "uint8 -> float32 (exact)");
  m.def("ue8m0_from_scale", &ref::ue8m0_from_scale);
  m.def("ue8m0_to_scale", &ref::ue8m0_to_scale);
  m.def("ue8m0_words_per_row", &ref::ue8m0_words_per_row);
  m.def(
      "fp8_group_scale",
      [](const In<uint16_t>& x, bool round_scale) {
        return ref::fp8_group_scale(x.data(), int64_t(x.size()), round_scale);
      },
      nb::arg("x"), nb::arg("round_scale") = false);
  m.attr("FP8_GROUP_SIZE") = ref::kFp8GroupSize;
  m.attr("E4M3_MAX") = ref::kE4m3Max;
  m.attr("FP8_AMAX_FLOOR") = ref::kFp8AmaxFloor;

  nb::enum_<ref::RowFormat>(m, "RowFormat")
      .value("bf16", ref::RowFormat::kBf16)
      .value("fp8", ref::RowFormat::kFp8)
      .value("fp8_ue8m0", ref::RowFormat::kFp8Ue8m0);

  nb::class_<ref::TokenRows> rows(m, "TokenRows",
                                  "[rows, hidden] BF16, or FP8 e4m3 + per-128-channel scales");
  rows.def(nb::init<>())
      .def_static(
          "from_bf16",
          [](const In<uint16_t>& x) {
            return ref::bf16_rows(rows_of(x, -1, "x"), x.ndim() == 2 ? int64_t(x.shape(1)) : 0, to_vec(x));
          },
          nb::arg("x"))
      .def_static(
          "from_fp8",
          [](const In<uint8_t>& q, const In<float>& scales) {
            ref::TokenRows r =
                ref::make_token_rows(ref::RowFormat::kFp8, rows_of(q, -1, "x"), int64_t(q.shape(1)));
            r.fp8 = to_vec(q);
            r.scales = to_vec(scales);
            ref::validate_rows(r, "x");
            return r;
          },
          nb::arg("x"), nb::arg("scales"))
      .def_static(
          "from_fp8_ue8m0",
          [](const In<uint8_t>& q, const In<int32_t>& packed) {
            ref::TokenRows r =
                ref::make_token_rows(ref::RowFormat::kFp8Ue8m0, rows_of(q, -1, "x"), int64_t(q.shape(1)));
            r.fp8 = to_vec(q);
            r.packed_scales = to_vec(packed);
            ref::validate_rows(r, "x");
            return r;
          },
          nb::arg("x"), nb::arg("packed_scales"))
      .def_rw("format", &ref::TokenRows::format)
      .def_rw("rows", &ref::TokenRows::rows)
      .def_rw("hidden", &ref::TokenRows::hidden)
      .def("is_fp8", &ref::TokenRows::is_fp8)
      .def("scale_columns", &ref::TokenRows::scale_columns)
      .def("scale", &ref::TokenRows::scale)
      .def("value", &ref::TokenRows::value)
      .def("dequantize",
           [](const ref::TokenRows& r) {
             return to_np<float>(ref::dequantize(r), {size_t(r.rows), size_t(r.hidden)});
           })
      .def("validate", [](const ref::TokenRows& r) { ref::validate_rows(r, "rows"); });
  vec_rw(rows, "bf16", &ref::TokenRows::bf16);
  vec_rw(rows, "fp8", &ref::TokenRows::fp8);
  vec_rw(rows, "scales", &ref::TokenRows::scales);
  vec_rw(rows, "packed_scales", &ref::TokenRows::packed_scales);

  m.def(
      "cast_to_fp8",
      [](const In<uint16_t>& x, bool round_scale, bool use_ue8m0) {
        const int64_t r = rows_of(x, -1, "x");
        return ref::cast_to_fp8(x.data(), r, int64_t(x.shape(1)), round_scale, use_ue8m0);
      },
      nb::arg("x"), nb::arg("round_scale") = false, nb::arg("use_ue8m0") = false,
      "The per-128-channel FP8 cast of a BF16 [rows, hidden] array (uint16); returns TokenRows");
}

void bind_layout_and_ht(nb::module_& m) {
  nb::class_<ref::DispatchLayout> layout(m, "DispatchLayout");
  vec_rw(layout, "num_tokens_per_rank", &ref::DispatchLayout::num_tokens_per_rank);
  vec_rw(layout, "num_tokens_per_expert", &ref::DispatchLayout::num_tokens_per_expert);
  vec_rw(layout, "is_token_in_rank", &ref::DispatchLayout::is_token_in_rank);
  m.def(
      "get_dispatch_layout",
      [](nb::ndarray<nb::c_contig, nb::device::cpu> topk_idx, int num_experts, int num_ranks) {
        if (topk_idx.ndim() != 2) invalid("topk_idx must be 2-D [num_tokens, topk]");
        const int64_t T = int64_t(topk_idx.shape(0));
        const int K = int(topk_idx.shape(1));
        if (topk_idx.dtype() == nb::dtype<int64_t>()) {
          const auto* p = static_cast<const int64_t*>(topk_idx.data());
          return ref::get_dispatch_layout(std::vector<int64_t>(p, p + T * K), T, K, num_experts, num_ranks);
        }
        if (topk_idx.dtype() == nb::dtype<int32_t>()) {
          const auto* p = static_cast<const int32_t*>(topk_idx.data());
          return ref::get_dispatch_layout(std::vector<int32_t>(p, p + T * K), T, K, num_experts, num_ranks);
        }
        invalid("topk_idx must be int64 or int32");
      },
      nb::arg("topk_idx"), nb::arg("num_experts"), nb::arg("num_ranks"));

  nb::class_<ref::HtDispatchParams>(m, "HtDispatchParams")
      .def(nb::init<>())
      .def_rw("num_experts", &ref::HtDispatchParams::num_experts)
      .def_rw("topk", &ref::HtDispatchParams::topk)
      .def_rw("expert_alignment", &ref::HtDispatchParams::expert_alignment);
  nb::class_<ref::HtDispatchInput> din(m, "HtDispatchInput");
  din.def(nb::init<>()).def_rw("x", &ref::HtDispatchInput::x);
  vec_rw(din, "topk_idx", &ref::HtDispatchInput::topk_idx);
  vec_rw(din, "topk_weights", &ref::HtDispatchInput::topk_weights);
  vec_rw(din, "is_token_in_rank", &ref::HtDispatchInput::is_token_in_rank);

  nb::class_<ref::HtHandle> h(m, "HtHandle");
  h.def(nb::init<>())
      .def_rw("rank", &ref::HtHandle::rank)
      .def_rw("num_ranks", &ref::HtHandle::num_ranks)
      .def_rw("topk", &ref::HtHandle::topk)
      .def_rw("num_tokens", &ref::HtHandle::num_tokens)
      .def("num_recv", &ref::HtHandle::num_recv);
  vec_rw(h, "rank_prefix", &ref::HtHandle::rank_prefix);
  vec_rw(h, "recv_src_rank", &ref::HtHandle::recv_src_rank);
  vec_rw(h, "recv_src_token", &ref::HtHandle::recv_src_token);
  vec_rw(h, "is_token_in_rank", &ref::HtHandle::is_token_in_rank);
  vec_rw(h, "send_row", &ref::HtHandle::send_row);

  nb::class_<ref::HtDispatchOutput> dout(m, "HtDispatchOutput");
  dout.def_rw("x", &ref::HtDispatchOutput::x).def_rw("handle", &ref::HtDispatchOutput::handle);
  vec_rw(dout, "topk_idx", &ref::HtDispatchOutput::topk_idx);
  vec_rw(dout, "topk_weights", &ref::HtDispatchOutput::topk_weights);
  vec_rw(dout, "num_recv_tokens_per_expert", &ref::HtDispatchOutput::num_recv_tokens_per_expert);
  m.def("ht_dispatch", &ref::ht_dispatch, nb::arg("params"), nb::arg("inputs"));
  m.def("ht_dispatch_cached", &ref::ht_dispatch_cached, nb::arg("handles"), nb::arg("x"));

  nb::class_<ref::HtCombineInput> cin(m, "HtCombineInput");
  cin.def(nb::init<>());
  vec_rw(cin, "x", &ref::HtCombineInput::x);
  vec_rw(cin, "topk_weights", &ref::HtCombineInput::topk_weights);
  vec_rw(cin, "bias0", &ref::HtCombineInput::bias0);
  vec_rw(cin, "bias1", &ref::HtCombineInput::bias1);
  nb::class_<ref::HtCombineOutput> cout(m, "HtCombineOutput");
  vec_rw(cout, "x", &ref::HtCombineOutput::x);
  vec_rw(cout, "topk_weights", &ref::HtCombineOutput::topk_weights);
  m.def("ht_combine", &ref::ht_combine, nb::arg("handles"), nb::arg("inputs"), nb::arg("hidden"));
}

void bind_ll(nb::module_& m) {
  nb::class_<ref::LlDispatchParams>(m, "LlDispatchParams")
      .def(nb::init<>())
      .def_rw("num_experts", &ref::LlDispatchParams::num_experts)
      .def_rw("hidden", &ref::LlDispatchParams::hidden)
      .def_rw("topk", &ref::LlDispatchParams::topk)
      .def_rw("num_max_dispatch_tokens_per_rank", &ref::LlDispatchParams::num_max_dispatch_tokens_per_rank)
      .def_rw("use_fp8", &ref::LlDispatchParams::use_fp8)
      .def_rw("round_scale", &ref::LlDispatchParams::round_scale)
      .def_rw("use_ue8m0", &ref::LlDispatchParams::use_ue8m0);
  nb::class_<ref::LlDispatchInput> din(m, "LlDispatchInput");
  din.def(nb::init<>()).def_rw("num_tokens", &ref::LlDispatchInput::num_tokens);
  vec_rw(din, "x", &ref::LlDispatchInput::x);
  vec_rw(din, "topk_idx", &ref::LlDispatchInput::topk_idx);

  nb::class_<ref::LlHandle> h(m, "LlHandle");
  h.def(nb::init<>())
      .def_rw("rank", &ref::LlHandle::rank)
      .def_rw("num_ranks", &ref::LlHandle::num_ranks)
      .def_rw("num_experts", &ref::LlHandle::num_experts)
      .def_rw("num_local_experts", &ref::LlHandle::num_local_experts)
      .def_rw("topk", &ref::LlHandle::topk)
      .def_rw("capacity", &ref::LlHandle::capacity)
      .def_rw("hidden", &ref::LlHandle::hidden)
      .def_rw("num_tokens", &ref::LlHandle::num_tokens)
      .def("slots_per_expert", &ref::LlHandle::slots_per_expert);
  vec_rw(h, "recv_count", &ref::LlHandle::recv_count);
  vec_rw(h, "src_rank", &ref::LlHandle::src_rank);
  vec_rw(h, "src_token", &ref::LlHandle::src_token);
  vec_rw(h, "range_begin", &ref::LlHandle::range_begin);
  vec_rw(h, "range_count", &ref::LlHandle::range_count);

  nb::class_<ref::LlDispatchOutput>(m, "LlDispatchOutput")
      .def(nb::init<>())
      .def_rw("x", &ref::LlDispatchOutput::x)
      .def_rw("handle", &ref::LlDispatchOutput::handle);
  m.def("ll_dispatch", &ref::ll_dispatch, nb::arg("params"), nb::arg("inputs"));
  m.def(
      "canonicalize_ll_recv",
      [](ref::LlDispatchOutput recv) {
        ref::canonicalize_ll_recv(recv);
        return recv;
      },
      nb::arg("recv"), "Returns a copy reordered into the oracle's slot order");

  nb::class_<ref::LlCombineInput> cin(m, "LlCombineInput");
  cin.def(nb::init<>());
  vec_rw(cin, "x", &ref::LlCombineInput::x);
  vec_rw(cin, "topk_idx", &ref::LlCombineInput::topk_idx);
  vec_rw(cin, "topk_weights", &ref::LlCombineInput::topk_weights);
  m.def(
      "ll_combine",
      [](const std::vector<ref::LlHandle>& handles, const std::vector<ref::LlCombineInput>& inputs) {
        std::vector<Out<uint16_t>> out;
        for (auto& v : ref::ll_combine(handles, inputs)) out.push_back(flat(v));
        return out;
      },
      nb::arg("handles"), nb::arg("inputs"), "BF16 [T_s, H] per source rank, flat uint16");
}

}  // namespace

void bind_reference(nb::module_& m) {
  bind_numerics(m);
  bind_layout_and_ht(m);
  bind_ll(m);
}

}  // namespace expertlink::python
