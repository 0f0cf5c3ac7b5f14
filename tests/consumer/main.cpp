// Uses only the installed public headers; runs without a GPU.
#include <cstdio>

#include <expertlink/error.hpp>
#include <expertlink/reference.hpp>
#include <expertlink/version.hpp>
#include <expertlink/workload.hpp>

int main() {
  auto topk =
      expertlink::workload::make_topk_idx(16, 4, 32, 2, expertlink::workload::Routing::kUniform, 1, 0);
  std::printf("consumer: NCCL compiled %d, loaded %d; %zu routing entries\n",
              expertlink::nccl_version_compiled(), expertlink::nccl_version_loaded(), topk.size());
  try {
    throw expertlink::Error(expertlink::ErrorCode::kInvalidArgument, "probe");
  } catch (const expertlink::Error& e) {
    return e.code() == expertlink::ErrorCode::kInvalidArgument ? 0 : 1;
  }
}
