#pragma once

namespace expertlink {

// Every wait ExpertLink makes (a GPU spin on a peer's flag, a host wait on a stream) gives up after
// `timeout_s` and reports whom it waited for. Default: $EXPERTLINK_TIMEOUT_S, else 5 seconds.
struct RuntimeOptions {
  double timeout_s;
  RuntimeOptions();
};

}  // namespace expertlink
