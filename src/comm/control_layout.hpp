// The control region at the start of every rank's symmetric window. Each slot indexed by a rank is
// written only by that rank (into the owner's window, over NVLink) and read only by the owner; values
// are monotonically increasing round numbers, so nothing is ever reset.
#pragma once

#include <cstddef>
#include <cstdint>

namespace expertlink {

inline constexpr int kMaxRanks = 64;
inline constexpr int kMaxChunks = 256;  // token chunks per source rank in the HT protocol
inline constexpr int kMaxExpertsTotal = 1024;
inline constexpr size_t kWindowAlignment = 2u << 20;

namespace control {
// u64 [kMaxRanks]: barrier epoch of rank s (kernels/barrier.cuh).
inline constexpr size_t kBarrier = 0;
// u64 [kMaxRanks]: HT notify round of rank s; published after s wrote its meta record here.
inline constexpr size_t kNotifyTag = 512;
// u64 [kMaxRanks]: HT dispatch / combine round that rank s has started, i.e. the round for which s's
// receiving area may be overwritten (its previous round finished, by stream order).
inline constexpr size_t kDispatchReady = 1024;
inline constexpr size_t kCombineReady = 1536;
// u64 [kMaxRanks]: 2 x (the dispatch round s started) + 1 if s dispatches direct (recv_x in its window),
// written before s's kDispatchReady: every rank checks that all ranks place their rows the same way.
inline constexpr size_t kDispatchMode = 2048;
// u64 [kMaxRanks]: the same for combine (+ 1: s reads the rows from the receive regions, direct combine).
inline constexpr size_t kCombineMode = 2560;
// u64 [kMaxRanks]: the last direct-combine round in which rank s has finished reading this rank's receive
// region; a direct dispatch (which overwrites it) waits for every rank's.
inline constexpr size_t kCombineDone = 3072;
// u64 [kMaxRanks][kMaxChunks]: round in which rank s finished writing chunk c of rows here.
inline constexpr size_t kDispatchChunk = 4096;
inline constexpr size_t kCombineChunk = kDispatchChunk + 8ull * kMaxRanks * kMaxChunks;
// i32 [2 parities][kMaxRanks][kMetaInts]: HT notify meta record of rank s for round r in parity r & 1.
// A rank can be at most one notify round ahead of another (each round waits for everyone's record of
// that round), so two parities never collide.
inline constexpr size_t kMeta = 512u << 10;
inline constexpr int kMetaHeader = 8;  // [0] T of s, [1] rows s sends here, [2] hidden, [3] topk, [4] E
// Then kMaxChunks per-chunk counts, kMaxExpertsTotal per-local-expert counts, and at kMetaTotals the rows s
// sends to every rank (so every rank knows where its rows land at each destination: direct dispatch).
inline constexpr int kMetaTotals = kMetaHeader + kMaxChunks + kMaxExpertsTotal;
inline constexpr int kMetaInts = kMetaTotals + kMaxRanks;
inline constexpr size_t kMetaBytes = 2ull * kMaxRanks * kMetaInts * 4;
inline constexpr size_t kEnd = kMeta + kMetaBytes;
}  // namespace control

// Low-latency (LL) path, [1280 KiB, 2 MiB) of the control region (protocol: kernels/ll_protocol.cuh).
// Every array is u64 [2 buffer parities][kMaxRanks]; slot [p][r] of a window is written only by rank r
// and holds the use count n (1, 2, ...) of parity p that r's signal refers to.
namespace control::ll {
inline constexpr size_t kBase = 1280u << 10;
inline constexpr size_t kArrayBytes = 2ull * kMaxRanks * 8;
// In receiver d's window, [p][s]: s has written its dispatch messages (and meta record) of use n into d.
inline constexpr size_t kDispatchData = kBase;
// In sender s's window, [p][d]: d has finished reading its dispatch area p of use n (s may write n + 1).
inline constexpr size_t kDispatchFree = kDispatchData + kArrayBytes;
// In expert holder d's window, [p][s]: s has pushed its combine weights of use n into d.
inline constexpr size_t kCombineWeights = kDispatchFree + kArrayBytes;
// In source s's window, [p][d]: d has written its partial sums of use n into s.
inline constexpr size_t kCombineData = kCombineWeights + kArrayBytes;
// In every rank r's window, [p][d]: d has finished reading its combine area p of use n.
inline constexpr size_t kCombineFree = kCombineData + kArrayBytes;
// kDispatchData, kCombineWeights and kCombineData are not written by the current kernels: data arrival
// is signalled per message inside the LL areas (kernels/ll_protocol.cuh). The slots stay reserved.
inline constexpr size_t kEnd = kCombineFree + kArrayBytes;
}  // namespace control::ll

inline constexpr size_t kControlBytes = kWindowAlignment;
static_assert(control::kCombineChunk + 8ull * kMaxRanks * kMaxChunks <= control::kMeta, "control overlap");
static_assert(control::kEnd <= kControlBytes, "control region too small");
static_assert(control::kEnd <= control::ll::kBase && control::ll::kEnd <= kControlBytes,
              "LL control slots overlap");

}  // namespace expertlink
