#include <gtest/gtest.h>

#include "check.hpp"
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

TEST(Version, LoadedNcclMatchesCompiledMajorMinor) {
  // Works without a GPU: ncclGetVersion only reads the library.
  EXPECT_EQ(nccl_version_loaded() / 100, nccl_version_compiled() / 100);
}

}  // namespace
}  // namespace expertlink
