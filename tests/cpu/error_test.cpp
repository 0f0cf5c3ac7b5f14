#include <gtest/gtest.h>

#include "check.hpp"
#include "comm/wait_record.hpp"
#include "expertlink/version.hpp"

namespace expertlink {
namespace {

TEST(ErrorModel, CheckFailureCarriesCodeArgumentAndLocation) {
  int top_k = 40;
  try {
    EL_CHECK(top_k <= 32, "top_k = %d exceeds the maximum of %d", top_k, 32);
    FAIL() << "EL_CHECK did not throw";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument);
    std::string what = e.what();
    EXPECT_NE(what.find("top_k = 40 exceeds the maximum of 32"), std::string::npos) << what;
    EXPECT_NE(what.find("error_test.cpp:"), std::string::npos) << what;
  }
}

TEST(ErrorModel, CheckPassingDoesNotThrow) {
  EXPECT_NO_THROW(EL_CHECK(1 + 1 == 2, "arithmetic"));
}

TEST(ErrorModel, CudaCheckNamesTheCallAndError) {
  try {
    EL_CUDA_CHECK(cudaErrorInvalidValue);
    FAIL() << "EL_CUDA_CHECK did not throw";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kCuda);
    EXPECT_NE(std::string(e.what()).find("cudaErrorInvalidValue"), std::string::npos) << e.what();
  }
}

TEST(ErrorModel, NcclCheckNamesTheCallAndError) {
  try {
    EL_NCCL_CHECK(ncclInvalidArgument);
    FAIL() << "EL_NCCL_CHECK did not throw";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kNccl);
    EXPECT_NE(std::string(e.what()).find("ncclInvalidArgument"), std::string::npos) << e.what();
  }
}

TEST(WaitRecord, EverySiteHasAName) {
  for (WaitSite site : {WaitSite::kBarrier, WaitSite::kHtNotify, WaitSite::kHtDispatchReady,
                        WaitSite::kHtDispatchChunk, WaitSite::kHtCombineReady, WaitSite::kHtCombineChunk,
                        WaitSite::kHtCombineDone, WaitSite::kLlDispatchFree, WaitSite::kLlDispatchData,
                        WaitSite::kLlCombineFree, WaitSite::kLlCombineWeights, WaitSite::kLlCombineData,
                        WaitSite::kBulkCopy, WaitSite::kHtSendSteps, WaitSite::kMismatch})
    EXPECT_STRNE(wait_site_name(site), "unknown site") << static_cast<int>(site);
}

WaitRecord complete_record(WaitSite site, int rank, int peer, int counter, uint64_t expected, uint64_t seen,
                           uint64_t waited_ns) {
  return WaitRecord{/*flag: complete*/ 2,
                    static_cast<int32_t>(site),
                    rank,
                    peer,
                    counter,
                    /*reserved*/ 0,
                    expected,
                    seen,
                    waited_ns};
}

TEST(WaitRecord, TimeoutNamesBothRanksTheSiteAndTheCounter) {
  EXPECT_EQ(describe(complete_record(WaitSite::kHtDispatchChunk, 0, 1, 7, 3, 2, 1500000000)),
            "rank 0 timed out after 1.500 s in HT dispatch (chunk arrival) waiting for rank 1: counter 7 "
            "expected >= 3, saw 2");
}

TEST(WaitRecord, MismatchNamesTheArgument) {
  EXPECT_EQ(describe(complete_record(WaitSite::kMismatch, 1, 0, /*topk*/ 1, 8, 6, 0)),
            "rank 1 and rank 0 called with different topk: 8 here, 6 there");
}

TEST(Version, LoadedNcclMatchesCompiledMajorMinor) {
  // Works without a GPU: ncclGetVersion only reads the library.
  EXPECT_EQ(nccl_version_loaded() / 100, nccl_version_compiled() / 100);
}

}  // namespace
}  // namespace expertlink
