#pragma once

namespace expertlink {

// NCCL_VERSION_CODE the library was compiled against, and the version of the libnccl that is loaded in
// this process. Communicator creation refuses to run when their major.minor differ: the device API's
// structures are not stable across minor versions.
int nccl_version_compiled();
int nccl_version_loaded();

}  // namespace expertlink
