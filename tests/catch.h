// Catch2 behind one include: v2 (Debian bookworm, one header) or v3 (Debian
// trixie, split headers), with the string matcher under one name.
#pragma once

#include <string>

#if __has_include(<catch2/catch_test_macros.hpp>) // Catch2 v3
#include <catch2/catch_approx.hpp>
#include <catch2/catch_session.hpp>
#include <catch2/catch_test_macros.hpp>
#include <catch2/generators/catch_generators.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>

using Catch::Approx;

namespace fixture::matchers {
/// Matches a string that contains `s` (v3 names it ContainsSubstring).
inline auto Contains(const std::string& s) {
  return Catch::Matchers::ContainsSubstring(s);
}
} // namespace fixture::matchers
#else // Catch2 v2
#include <catch2/catch.hpp>

namespace fixture::matchers {
using Catch::Matchers::Contains;
} // namespace fixture::matchers
#endif
