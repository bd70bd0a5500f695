// libFuzzer targets for the example's readers of files a user supplies: the
// JSON data sets, raw e-mails (MIME, base64, quoted-printable, HTML), the
// GloVe JSON vectors and the tuned-options CSV. One target per build, chosen
// by FUZZ_JSON, FUZZ_EMAIL, FUZZ_GLOVE or FUZZ_TUNED (tests/fuzz/run.sh
// builds each with clang's -fsanitize=fuzzer,address,undefined). A reader
// may refuse its input with an exception derived from std::exception; any
// other way out (a sanitizer report, a crash, an uncaught exception) is a
// finding.

#include "config.h"
#include "dataset.h"
#include "email.h"
#include "glove.h"

#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <string>

namespace {

/// A file holding the current input (readers take paths).
const std::string& input_path() {
  static const std::string path = [] {
    char name[] = "/tmp/advtrain-fuzz-XXXXXX";
    const int fd = mkstemp(name);
    if (fd < 0) {
      std::perror("mkstemp");
      std::abort();
    }
    close(fd);
    return std::string(name);
  }();
  return path;
}

void write_input(const uint8_t* data, size_t size) {
  std::FILE* f = std::fopen(input_path().c_str(), "wb");
  if (f == nullptr) {
    std::abort();
  }
  if (size > 0 && std::fwrite(data, 1, size, f) != size) {
    std::abort();
  }
  std::fclose(f);
}

} // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
#if defined(FUZZ_EMAIL)
    const std::string raw(reinterpret_cast<const char*>(data), size);
    (void)example::mail::email_to_text(raw);
#else
    write_input(data, size);
#if defined(FUZZ_JSON)
    const auto sentences = example::read_json_file(input_path());
    for (const auto& s : sentences) {
      (void)example::tokenize(s.text);
    }
#elif defined(FUZZ_GLOVE)
    (void)example::read_word_vectors(
        input_path(), {"good", "bad", "movie", "the", ""});
#elif defined(FUZZ_TUNED)
    (void)example::read_tuned(input_path(), "sentiment");
#else
#error "define one of FUZZ_JSON, FUZZ_EMAIL, FUZZ_GLOVE, FUZZ_TUNED"
#endif
#endif
  } catch (const std::exception&) { // refused, as a reader may
  }
  return 0;
}
