#include "expertlink/version.hpp"

#include "check.hpp"

namespace expertlink {

int nccl_version_compiled() {
  return NCCL_VERSION_CODE;
}

int nccl_version_loaded() {
  int v = 0;
  EL_NCCL_CHECK(ncclGetVersion(&v));
  return v;
}

}  // namespace expertlink
