// Argument checks shared by the CPU and the CUDA FFI handlers (host code):
// one wording for shape and dtype errors, whichever backend reports them.
#pragma once

#include <cstdint>
#include <string>

#include "xla/ffi/api/ffi.h"

namespace jaxfp4 {

// "[d0, d1, ...]" for error messages.
inline std::string dims_str(xla::ffi::Span<const int64_t> d) {
  std::string s = "[";
  for (size_t i = 0; i < d.size(); ++i) s += (i ? ", " : "") + std::to_string(d[i]);
  return s + "]";
}

// `buf` has dtype t and dims [*lead, r, c] (nlead leading axes).
inline xla::ffi::Error check_buffer(const xla::ffi::AnyBuffer& buf, const std::string& name, xla::ffi::DataType t,
                                    const int64_t* lead, int nlead, int64_t r, int64_t c) {
  const auto d = buf.dimensions();
  if (buf.element_type() != t)
    return xla::ffi::Error::InvalidArgument(name + " has the wrong dtype (code " +
                                            std::to_string(static_cast<int>(buf.element_type())) + ", expected " +
                                            std::to_string(static_cast<int>(t)) + ")");
  bool ok = static_cast<int>(d.size()) == nlead + 2 && d[nlead] == r && d[nlead + 1] == c;
  for (int i = 0; ok && i < nlead; ++i) ok = d[i] == lead[i];
  if (!ok) {
    std::string want = "[";
    for (int i = 0; i < nlead; ++i) want += std::to_string(lead[i]) + ", ";
    want += std::to_string(r) + ", " + std::to_string(c) + "]";
    return xla::ffi::Error::InvalidArgument(name + " has shape " + dims_str(d) + ", expected " + want);
  }
  return xla::ffi::Error::Success();
}

}  // namespace jaxfp4
