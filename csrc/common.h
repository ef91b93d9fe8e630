// Shared helpers for every kernel family: the error type that crosses into Python,
// and a fork-join parallel loop. No global state: the thread count is an argument.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace edgefed {

// Raised for any bad argument; bound to Python's ValueError.
struct InvalidArgument : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

inline void require(bool ok, const std::string& message) {
  if (!ok) throw InvalidArgument(message);
}

// Number of threads to use for n items when the caller asked for `requested`
// (0 = all hardware threads). Small inputs stay on one thread: below ~64K items
// the cost of starting a thread exceeds the work.
inline int effective_threads(std::size_t n, int requested, std::size_t min_per_thread = 1 << 16) {
  int hw = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  int t = requested <= 0 ? hw : requested;
  std::size_t by_size = std::max<std::size_t>(1, n / std::max<std::size_t>(1, min_per_thread));
  return static_cast<int>(std::max<std::size_t>(1, std::min<std::size_t>(t, by_size)));
}

// Splits [0, n) into `threads` contiguous ranges aligned to `align` items and calls
// fn(begin, end, part) on each; the calling thread runs the first range. Exceptions
// from any range are rethrown on the caller after every thread has joined.
template <class Fn>
void parallel_for(std::size_t n, int threads, std::size_t align, Fn&& fn) {
  if (n == 0) return;
  if (threads <= 1) {
    fn(std::size_t{0}, n, 0);
    return;
  }
  align = std::max<std::size_t>(1, align);
  std::size_t per = (n + threads - 1) / threads;
  per = (per + align - 1) / align * align;
  std::vector<std::thread> pool;
  std::vector<std::exception_ptr> errors(threads);
  for (int p = 1; p < threads; ++p) {
    std::size_t b = std::min(n, per * p), e = std::min(n, per * (p + 1));
    if (b >= e) break;
    pool.emplace_back([&, b, e, p] {
      try {
        fn(b, e, p);
      } catch (...) {
        errors[p] = std::current_exception();
      }
    });
  }
  try {
    fn(std::size_t{0}, std::min(n, per), 0);
  } catch (...) {
    errors[0] = std::current_exception();
  }
  for (auto& t : pool) t.join();
  for (auto& e : errors)
    if (e) std::rethrow_exception(e);
}

}  // namespace edgefed
