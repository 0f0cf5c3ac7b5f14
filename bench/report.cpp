#include "report.hpp"

#include <cstdio>

namespace expertlink::bench {

namespace {

template <typename T>
nlohmann::json or_null(const std::optional<T>& v) {
  return v ? nlohmann::json(*v) : nlohmann::json(nullptr);
}

template <typename T>
std::optional<T> opt(const nlohmann::json& j, const char* key) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return std::nullopt;
  return it->get<T>();
}

}  // namespace

nlohmann::json record_to_json(const Record& r) {
  return nlohmann::json{{"workload", r.workload},
                        {"library", r.library},
                        {"us", r.us},
                        {"gbps", r.gbps},
                        {"floor_us", or_null(r.floor_us)},
                        {"sms", or_null(r.sms)},
                        {"routing", r.routing},
                        {"tokens", r.tokens},
                        {"buffer_bytes", or_null(r.buffer_bytes)},
                        {"bytes", r.bytes},
                        {"remote_bytes", r.remote_bytes},
                        {"rank_us", r.rank_us},
                        {"kernel_us", or_null(r.kernel_us)},
                        {"rank_kernel_us", r.rank_kernel_us},
                        {"verified", r.verified}};
}

Record record_from_json(const nlohmann::json& j) {
  Record r;
  r.workload = j.at("workload").get<std::string>();
  r.library = j.at("library").get<std::string>();
  r.routing = j.at("routing").get<std::string>();
  r.tokens = j.at("tokens").get<int64_t>();
  r.us = j.at("us").get<double>();
  r.gbps = j.at("gbps").get<double>();
  r.floor_us = opt<double>(j, "floor_us");
  r.sms = opt<int>(j, "sms");
  r.buffer_bytes = opt<int64_t>(j, "buffer_bytes");
  r.bytes = j.value("bytes", int64_t{0});
  r.remote_bytes = j.value("remote_bytes", int64_t{0});
  r.rank_us = j.value("rank_us", std::vector<double>{});
  r.kernel_us = opt<double>(j, "kernel_us");
  r.rank_kernel_us = j.value("rank_kernel_us", std::vector<double>{});
  r.verified = j.value("verified", false);
  return r;
}

nlohmann::json make_report(const RunInfo& info, const std::vector<Record>& records) {
  nlohmann::json recs = nlohmann::json::array();
  for (const Record& r : records) recs.push_back(record_to_json(r));
  return nlohmann::json{{"card", info.card},
                        {"gpus", info.gpus},
                        {"driver", info.driver},
                        {"commit", info.commit},
                        {"date", info.date},
                        {"peer_copy_gbps", or_null(info.peer_copy_gbps)},
                        {"d2d_copy_gbps", or_null(info.d2d_copy_gbps)},
                        {"seed", info.seed},
                        {"iters", info.iters},
                        {"warmup", info.warmup},
                        {"nccl_version", info.nccl_version},
                        {"sm_count", info.sm_count},
                        {"records", recs}};
}

std::string utc_date(std::time_t t) {
  std::tm tm{};
  gmtime_r(&t, &tm);
  char buf[16];
  std::strftime(buf, sizeof buf, "%Y-%m-%d", &tm);
  return buf;
}

std::string sanitize_card(const std::string& card) {
  std::string s;
  for (char c : card) {
    bool keep = (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '.' ||
                c == '_' || c == '-';
    s.push_back(keep ? c : '-');
  }
  return s.empty() ? "unknown" : s;
}

std::string result_filename(const RunInfo& info) {
  // One file per (date, card, GPU count, commit): a later run of another commit never overwrites a record.
  return info.date + "_" + sanitize_card(info.card) + "x" + std::to_string(info.gpus) + "_" +
         sanitize_card(info.commit) + ".json";
}

std::optional<double> baseline_us(const std::vector<Record>& records, const Record& r) {
  // A variant's workload ("ht_dispatch_fp8_exact") is compared with its op's baseline ("ht_dispatch_fp8").
  auto same_op = [&](const std::string& base) {
    return r.workload == base ||
           (r.workload.size() > base.size() + 1 && r.workload.compare(0, base.size(), base) == 0 &&
            r.workload[base.size()] == '_');
  };
  std::optional<double> variant;
  for (const Record& b : records) {
    if (b.library != "nccl" || b.routing != r.routing || b.tokens != r.tokens) continue;
    if (b.workload == r.workload) return b.us;
    if (same_op(b.workload)) variant = b.us;
  }
  return variant;
}

namespace {

std::string fmt(const char* f, double v) {
  char buf[64];
  std::snprintf(buf, sizeof buf, f, v);
  return buf;
}

}  // namespace

std::string table_header() {
  char buf[256];
  std::snprintf(buf, sizeof buf, "%-17s %-10s %-7s %6s %10s %8s %9s %7s %4s %8s %10s %8s %9s %s", "workload",
                "library", "routing", "tokens", "us", "GB/s", "floor_us", "/floor", "SMs", "buf_MB",
                "nccl_us", "speedup", "kernel_us", "check");
  return buf;
}

std::string format_row(const std::vector<Record>& records, const Record& r) {
  std::optional<double> base = baseline_us(records, r);
  std::string floor = r.floor_us ? fmt("%.1f", *r.floor_us) : "-";
  std::string ratio = r.floor_us && *r.floor_us > 0 ? fmt("%.2f", r.us / *r.floor_us) : "-";
  std::string sms = r.sms ? std::to_string(*r.sms) : "-";
  std::string buf_mb = r.buffer_bytes ? fmt("%.1f", static_cast<double>(*r.buffer_bytes) / 1e6) : "-";
  std::string base_s = base ? fmt("%.1f", *base) : "-";
  std::string speedup = base && r.us > 0 ? fmt("%.2f", *base / r.us) : "-";
  std::string kernel = r.kernel_us ? fmt("%.1f", *r.kernel_us) : "-";
  char buf[512];
  std::snprintf(buf, sizeof buf, "%-17s %-10s %-7s %6lld %10.1f %8.1f %9s %7s %4s %8s %10s %8s %9s %s",
                r.workload.c_str(), r.library.c_str(), r.routing.c_str(), static_cast<long long>(r.tokens),
                r.us, r.gbps, floor.c_str(), ratio.c_str(), sms.c_str(), buf_mb.c_str(), base_s.c_str(),
                speedup.c_str(), kernel.c_str(), r.verified ? "ok" : "FAILED");
  return buf;
}

std::string format_table(const std::vector<Record>& records) {
  std::string s = table_header() + "\n";
  for (const Record& r : records) s += format_row(records, r) + "\n";
  return s;
}

}  // namespace expertlink::bench
