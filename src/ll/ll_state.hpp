// Device-local state of the low-latency path, owned by Buffer::State.
#pragma once

namespace expertlink {

struct LlState {};

}  // namespace expertlink
