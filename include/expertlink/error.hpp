// The one error type of ExpertLink. Every failure that reaches a caller is an expertlink::Error carrying
// a code and a message that names the argument or peer involved, prefixed with file:line of the check.
#pragma once

#include <stdexcept>
#include <string>

namespace expertlink {

enum class ErrorCode {
  kInvalidArgument,  // the caller passed something the API does not accept; nothing was launched
  kCuda,             // a CUDA runtime call failed
  kNccl,             // an NCCL call failed
  kTimeout,          // a bounded wait (device or host) ran out; the message names the peer waited for
  kUnsupported,      // the platform lacks something required (e.g. NVLink symmetric memory)
  kInternal,         // a broken invariant inside the library
};

const char* error_code_name(ErrorCode code);

class Error : public std::runtime_error {
 public:
  Error(ErrorCode code, const std::string& message)
      : std::runtime_error(std::string(error_code_name(code)) + ": " + message), code_(code) {}
  ErrorCode code() const noexcept { return code_; }

 private:
  ErrorCode code_;
};

}  // namespace expertlink
