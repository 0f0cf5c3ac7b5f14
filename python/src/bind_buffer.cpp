// Communicator, Buffer, the HT/LL handles, the LL receive hook and the argument/output structs, as in
// include/expertlink/{communicator,buffer,low_latency}.hpp. Streams and NCCL communicators are ints
// (cudaStream_t / ncclComm_t values); calls that may wait on the host (collective constructors, exact
// notify, synchronize) release the GIL. UNTESTED ON GPU as of 2026-11-28 (CI has no GPU).
#include <cstring>
#include <optional>

#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include "common.hpp"
#include "expertlink/buffer.hpp"
#include "expertlink/communicator.hpp"
#include "expertlink/low_latency.hpp"
#include "expertlink/options.hpp"

namespace expertlink::python {
namespace {

cudaStream_t as_stream(uintptr_t s) {
  return reinterpret_cast<cudaStream_t>(s);
}

ncclUniqueId id_from_bytes(nb::bytes b) {
  ncclUniqueId id;
  if (b.size() != sizeof(id.internal))
    invalid("a unique id is " + std::to_string(sizeof(id.internal)) + " bytes, got " +
            std::to_string(b.size()));
  std::memcpy(id.internal, b.c_str(), sizeof(id.internal));
  return id;
}

RuntimeOptions make_options(std::optional<double> timeout_s) {
  RuntimeOptions o;
  if (timeout_s) {
    if (!(*timeout_s > 0)) invalid("timeout_s = " + std::to_string(*timeout_s) + " must be > 0");
    o.timeout_s = *timeout_s;
  }
  return o;
}

using Release = nb::call_guard<nb::gil_scoped_release>;

}  // namespace

void bind_buffer(nb::module_& m) {
  nb::class_<Communicator>(m, "Communicator",
                           "NCCL group. Communicator(unique_id: bytes, rank, num_ranks, device) creates one "
                           "(collective); Communicator.adopt(nccl_comm_ptr: int, split=True) takes the "
                           "caller's (e.g. torch's _comm_ptr()), split by default so lifetimes stay apart.")
      .def(
          "__init__",
          [](Communicator* self, nb::bytes id, int rank, int num_ranks, int device) {
            ncclUniqueId uid = id_from_bytes(id);
            nb::gil_scoped_release release;
            new (self) Communicator(uid, rank, num_ranks, device);
          },
          nb::arg("unique_id"), nb::arg("rank"), nb::arg("num_ranks"), nb::arg("device"))
      .def_static(
          "adopt",
          [](uintptr_t comm, bool split) {
            if (comm == 0)
              invalid(
                  "nccl comm pointer is 0 (torch creates its communicator lazily: pass device_id to "
                  "init_process_group or run a collective first)");
            nb::gil_scoped_release release;
            return new Communicator(reinterpret_cast<ncclComm_t>(comm),
                                    split ? Communicator::Adopt::kSplit : Communicator::Adopt::kBorrow);
          },
          nb::arg("nccl_comm"), nb::arg("split") = true, nb::rv_policy::take_ownership)
      .def_static("make_unique_id",
                  [] {
                    ncclUniqueId id = Communicator::make_unique_id();
                    return nb::bytes(id.internal, sizeof(id.internal));
                  })
      .def_prop_ro("rank", &Communicator::rank)
      .def_prop_ro("num_ranks", &Communicator::num_ranks)
      .def_prop_ro("device", &Communicator::device)
      .def_prop_ro("owned", &Communicator::owned)
      .def_prop_ro("nccl_comm", [](const Communicator& c) { return reinterpret_cast<uintptr_t>(c.nccl()); });

  nb::enum_<Sizing>(m, "Sizing").value("exact", Sizing::kExact).value("capacity", Sizing::kCapacity);

  nb::class_<HtDispatchArgs>(m, "HtDispatchArgs")
      .def(nb::init<>())
      .def_rw("x", &HtDispatchArgs::x)
      .def_rw("x_scales", &HtDispatchArgs::x_scales)
      .def_rw("topk_idx", &HtDispatchArgs::topk_idx)
      .def_rw("topk_weights", &HtDispatchArgs::topk_weights)
      .def_rw("is_token_in_rank", &HtDispatchArgs::is_token_in_rank)
      .def_rw("num_experts", &HtDispatchArgs::num_experts)
      .def_rw("expert_alignment", &HtDispatchArgs::expert_alignment)
      .def_rw("num_sms", &HtDispatchArgs::num_sms);
  nb::class_<HtDispatchOutputs>(m, "HtDispatchOutputs")
      .def(nb::init<>())
      .def_rw("recv_x", &HtDispatchOutputs::recv_x)
      .def_rw("recv_x_scales", &HtDispatchOutputs::recv_x_scales)
      .def_rw("recv_topk_idx", &HtDispatchOutputs::recv_topk_idx)
      .def_rw("recv_topk_weights", &HtDispatchOutputs::recv_topk_weights)
      .def_rw("num_recv_tokens_per_expert", &HtDispatchOutputs::num_recv_tokens_per_expert);
  nb::class_<HtCombineArgs>(m, "HtCombineArgs")
      .def(nb::init<>())
      .def_rw("x", &HtCombineArgs::x)
      .def_rw("topk_weights", &HtCombineArgs::topk_weights)
      .def_rw("bias0", &HtCombineArgs::bias0)
      .def_rw("bias1", &HtCombineArgs::bias1)
      .def_rw("num_sms", &HtCombineArgs::num_sms);
  nb::class_<HtCombineOutputs>(m, "HtCombineOutputs")
      .def(nb::init<>())
      .def_rw("combined_x", &HtCombineOutputs::combined_x)
      .def_rw("combined_topk_weights", &HtCombineOutputs::combined_topk_weights);

  nb::class_<HtHandle>(m, "HtHandle",
                       "Opaque: where one HT dispatch's rows came from and went (owns device memory).")
      .def(nb::init<>())
      .def_prop_ro("valid", &HtHandle::valid)
      .def("num_tokens", &HtHandle::num_tokens)
      .def("capacity", &HtHandle::capacity)
      .def("num_recv_tokens", &HtHandle::num_recv_tokens)
      .def("num_recv_tokens_per_expert", &HtHandle::num_recv_tokens_per_expert)
      .def("check_capacity", &HtHandle::check_capacity);

  nb::class_<LlDispatchOptions>(m, "LlDispatchOptions")
      .def(nb::init<>())
      .def_rw("use_fp8", &LlDispatchOptions::use_fp8)
      .def_rw("round_scale", &LlDispatchOptions::round_scale)
      .def_rw("use_ue8m0", &LlDispatchOptions::use_ue8m0)
      .def_rw("return_recv_hook", &LlDispatchOptions::return_recv_hook)
      .def_rw("deterministic", &LlDispatchOptions::deterministic);
  nb::class_<LlDispatchArgs>(m, "LlDispatchArgs")
      .def(nb::init<>())
      .def_rw("x", &LlDispatchArgs::x)
      .def_rw("topk_idx", &LlDispatchArgs::topk_idx)
      .def_rw("num_max_dispatch_tokens_per_rank", &LlDispatchArgs::num_max_dispatch_tokens_per_rank)
      .def_rw("num_experts", &LlDispatchArgs::num_experts)
      .def_rw("options", &LlDispatchArgs::options);
  nb::class_<LlDispatchOutputs>(m, "LlDispatchOutputs")
      .def(nb::init<>())
      .def_rw("recv_x", &LlDispatchOutputs::recv_x)
      .def_rw("recv_scales", &LlDispatchOutputs::recv_scales)
      .def_rw("recv_count", &LlDispatchOutputs::recv_count)
      .def_rw("src_info", &LlDispatchOutputs::src_info)
      .def_rw("layout_range", &LlDispatchOutputs::layout_range);
  nb::class_<LlCombineArgs>(m, "LlCombineArgs")
      .def(nb::init<>())
      .def_rw("x", &LlCombineArgs::x)
      .def_rw("topk_idx", &LlCombineArgs::topk_idx)
      .def_rw("topk_weights", &LlCombineArgs::topk_weights)
      .def_rw("zero_copy", &LlCombineArgs::zero_copy)
      .def_rw("return_recv_hook", &LlCombineArgs::return_recv_hook);
  nb::class_<LlCombineOutputs>(m, "LlCombineOutputs").def(nb::init<>()).def_rw("out", &LlCombineOutputs::out);

  nb::class_<LlHandle>(m, "LlHandle", "Opaque: where one LL dispatch's rows went (owns small device arrays).")
      .def(nb::init<>())
      .def_prop_ro("valid", &LlHandle::valid)
      .def("num_tokens", &LlHandle::num_tokens)
      .def("num_max_dispatch_tokens_per_rank", &LlHandle::num_max_dispatch_tokens_per_rank)
      .def("hidden", &LlHandle::hidden)
      .def("topk", &LlHandle::topk)
      .def("num_experts", &LlHandle::num_experts)
      .def("num_ranks", &LlHandle::num_ranks);

  nb::class_<LlRecvHook>(
      m, "LlRecvHook",
      "Receive half of a split LL call: call it once with a stream (int). Not valid when the "
      "call was not split or the hook was already called.")
      .def(nb::init<>())
      .def_prop_ro("valid", &LlRecvHook::valid)
      .def(
          "__call__", [](LlRecvHook& h, uintptr_t stream) { h.receive(as_stream(stream)); },
          nb::arg("stream"), Release())
      .def(
          "receive", [](LlRecvHook& h, uintptr_t stream) { h.receive(as_stream(stream)); }, nb::arg("stream"),
          Release());

  nb::class_<Buffer>(m, "Buffer",
                     "Buffer(comm, ht_bytes, ll_bytes=0, timeout_s=None, ht_recv_bytes=0): collective; one "
                     "symmetric window with an HT and an LL region, and with ht_recv_bytes > 0 the receive "
                     "region of direct dispatch (ht_window_recv_x). Keeps the Communicator alive.")
      .def(
          "__init__",
          [](Buffer* self, const Communicator& comm, size_t ht_bytes, size_t ll_bytes,
             std::optional<double> timeout, size_t ht_recv_bytes) {
            RuntimeOptions o = make_options(timeout);
            nb::gil_scoped_release release;
            new (self) Buffer(comm, ht_bytes, ll_bytes, o, ht_recv_bytes);
          },
          nb::arg("comm"), nb::arg("ht_bytes"), nb::arg("ll_bytes") = 0, nb::arg("timeout_s") = nb::none(),
          nb::arg("ht_recv_bytes") = 0, nb::keep_alive<1, 2>())
      .def_static("ht_size_hint", &Buffer::ht_size_hint, nb::arg("num_ranks"), nb::arg("max_tokens_per_rank"),
                  nb::arg("hidden"), nb::arg("topk"))
      .def_static("ht_recv_size_hint", &Buffer::ht_recv_size_hint, nb::arg("num_ranks"),
                  nb::arg("max_tokens_per_rank"), nb::arg("hidden"),
                  "ht_recv_bytes for direct dispatch of up to max_tokens_per_rank tokens per rank (BF16 rows "
                  "of `hidden`; they cover FP8's).")
      .def_static("ll_size_hint", &Buffer::ll_size_hint, nb::arg("num_ranks"),
                  nb::arg("num_max_dispatch_tokens_per_rank"), nb::arg("hidden"), nb::arg("num_experts"))
      .def_prop_ro("rank", &Buffer::rank)
      .def_prop_ro("num_ranks", &Buffer::num_ranks)
      .def_prop_ro("ht_bytes", &Buffer::ht_bytes)
      .def_prop_ro("ll_bytes", &Buffer::ll_bytes)
      .def_prop_ro("window_bytes", &Buffer::window_bytes)
      .def("default_ht_sms", &Buffer::default_ht_sms)
      .def("ll_sms", &Buffer::ll_sms)
      .def(
          "get_dispatch_layout",
          [](Buffer& b, const TensorView& topk_idx, int num_experts, const TensorView& per_rank,
             const TensorView& per_expert, const TensorView& in_rank, uintptr_t stream) {
            b.get_dispatch_layout(topk_idx, num_experts, per_rank, per_expert, in_rank, as_stream(stream));
          },
          nb::arg("topk_idx"), nb::arg("num_experts"), nb::arg("num_tokens_per_rank"),
          nb::arg("num_tokens_per_expert"), nb::arg("is_token_in_rank"), nb::arg("stream"), Release())
      .def(
          "ht_notify",
          [](Buffer& b, const HtDispatchArgs& args, HtHandle& handle, Sizing sizing, int64_t capacity,
             uintptr_t stream) { b.ht_notify(args, handle, sizing, capacity, as_stream(stream)); },
          nb::arg("args"), nb::arg("handle"), nb::arg("sizing"), nb::arg("capacity"), nb::arg("stream"),
          Release())
      .def(
          "ht_dispatch",
          [](Buffer& b, const HtDispatchArgs& args, HtHandle& handle, const HtDispatchOutputs& out,
             uintptr_t stream) { b.ht_dispatch(args, handle, out, as_stream(stream)); },
          nb::arg("args"), nb::arg("handle"), nb::arg("out"), nb::arg("stream"), Release())
      .def(
          "ht_combine",
          [](Buffer& b, const HtCombineArgs& args, const HtHandle& handle, const HtCombineOutputs& out,
             uintptr_t stream) { b.ht_combine(args, handle, out, as_stream(stream)); },
          nb::arg("args"), nb::arg("handle"), nb::arg("out"), nb::arg("stream"), Release())
      .def(
          "synchronize", [](Buffer& b, uintptr_t stream) { b.synchronize(as_stream(stream)); },
          nb::arg("stream"), Release())
      .def(
          "barrier", [](Buffer& b, uintptr_t stream) { b.barrier(as_stream(stream)); }, nb::arg("stream"),
          Release())
      .def(
          "ll_dispatch",
          [](Buffer& b, const LlDispatchArgs& args, LlHandle& handle, const LlDispatchOutputs& out,
             uintptr_t stream) { return b.ll_dispatch(args, handle, out, as_stream(stream)); },
          nb::arg("args"), nb::arg("handle"), nb::arg("out"), nb::arg("stream"), Release(),
          nb::keep_alive<0, 1>())
      .def(
          "ll_combine",
          [](Buffer& b, const LlCombineArgs& args, const LlHandle& handle, const LlCombineOutputs& out,
             uintptr_t stream) { return b.ll_combine(args, handle, out, as_stream(stream)); },
          nb::arg("args"), nb::arg("handle"), nb::arg("out"), nb::arg("stream"), Release(),
          nb::keep_alive<0, 1>())
      .def(
          "ht_window_recv_x",
          [](const Buffer& b, const std::string& dtype, int64_t hidden) {
            return b.ht_window_recv_x(parse_dtype(dtype), hidden);
          },
          nb::arg("dtype"), nb::arg("hidden"),
          "Dense [rows, hidden] view (a TensorView, dtype bf16 or fp8_e4m3) of the receive region, as many "
          "rows as it holds. ht_dispatch into it (same start, rows back to back) is a direct dispatch; "
          "ht_combine of its BF16 view a direct combine. Its rows are valid until the next ht_dispatch on "
          "this Buffer.")
      .def("get_next_ll_combine_buffer", &Buffer::get_next_ll_combine_buffer, nb::arg("handle"),
           "BF16 [E_local, R*N, H] device buffer (a TensorView; valid while the Buffer lives) that the next "
           "ll_combine with zero_copy reads.")
      .def(
          "ll_clean", [](Buffer& b, uintptr_t stream) { b.ll_clean(as_stream(stream)); }, nb::arg("stream"),
          Release());
}

}  // namespace expertlink::python
