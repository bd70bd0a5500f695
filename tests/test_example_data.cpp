// The example's data readers: raw e-mails (RFC 822, MIME, encodings, HTML)
// to text, checked on hand-written messages in tests/data/emails whose
// expected text was written down from the files, not from the code.

#include "email.h"
#include "glove.h"

#include "catch.h"

#include <filesystem>
#include <fstream>

using example::mail::email_to_text;
using example::mail::read_file;
using fixture::matchers::Contains;

namespace {

const std::string kEmails = std::string(ADVTRAIN_TEST_DATA_DIR) + "/emails";

std::string text_of(const std::string& name) {
  return email_to_text(read_file(kEmails + "/" + name));
}

/// The tokens, joined by single spaces.
std::string words(const std::string& text) {
  std::string out;
  for (const auto& t : example::tokenize(text)) {
    out += (out.empty() ? "" : " ") + t;
  }
  return out;
}

} // namespace

TEST_CASE("Transfer encodings decode RFC test vectors", "[example][email]") {
  using namespace example::mail;
  // RFC 4648 §10.
  CHECK(decode_base64("Zm9vYmFy") == "foobar");
  CHECK(decode_base64("Zm9vYg==") == "foob");
  CHECK(decode_base64("Zm9v\r\nYmE=") == "fooba");
  // RFC 2045 §6.7: =XX escapes and soft line breaks.
  CHECK(decode_quoted_printable("a=3Db=\r\nc =E9") == "a=bc \xE9");
  CHECK(decode_quoted_printable("not =ZZ hex") == "not =ZZ hex");
  // RFC 2047 encoded words, Q with "_" for space.
  CHECK(
      decode_header("=?utf-8?Q?hello_world?= and =?x?B?Zm9v?=") ==
      "hello world and foo");
  CHECK(html_to_text("&lt;b&gt;&amp;&#65;&#x42;&nbsp;x") == "<b>&AB x");
}

TEST_CASE(
    "E-mails become their subject and readable body", "[example][email]") {
  SECTION("plain text, folded subject, other headers dropped") {
    const auto t = text_of("ham/01.plain.eml");
    CHECK(
        words(t) ==
        "meeting notes for monday hi all the build is fixed notes from the "
        "meeting are attached below bob will review the patch");
  }
  SECTION("multipart/alternative: the base64 plain part, not the HTML") {
    const auto t = text_of("ham/02.alternative.eml");
    CHECK(words(t) == "re patch review the patch looks good to me");
  }
  SECTION(
      "multipart/mixed: quoted-printable text, no attachment, and the "
      "forwarded message") {
    const auto t = text_of("ham/03.mixed.eml");
    CHECK_THAT(t, Contains("caf\xE9 list"));
    CHECK_THAT(t, Contains("Soft line break and an equals sign = here."));
    CHECK_THAT(t, Contains("forwarded note"));
    CHECK_THAT(t, Contains("the forwarded body"));
    CHECK(t.find('\x01') == std::string::npos);
  }
  SECTION("HTML: text kept, script, style and comments dropped") {
    const auto t = text_of("spam/01.html.eml");
    CHECK(words(t) == "win cash now claim your free prize cash today");
    CHECK_THAT(t, Contains("prize & cash today!"));
  }
  SECTION("a base64 text body") {
    CHECK(
        words(text_of("spam/03.base64.eml")) ==
        "you are a winner you have won a million dollars send your bank "
        "details");
  }
  SECTION("no From line, one header") {
    CHECK(
        words(text_of("ham/04.report.eml")) ==
        "weekly report no headers problem numbers went up three percent");
  }
}

TEST_CASE("A directory of e-mails is labelled by folder", "[example][email]") {
  const auto data = example::read_email_dir(kEmails);
  REQUIRE(data.size() == 8);
  for (size_t i = 0; i < 4; ++i) { // ham/ sorts before spam/
    CHECK(data[i].label == 0);
    CHECK(data[i + 4].label == 1);
  }
  CHECK_THAT(data[0].text, Contains("Meeting notes"));
  CHECK_THAT(data[7].text, Contains("instant loan approval"));

  CHECK_THROWS_WITH(
      example::read_email_dir(kEmails + "/no_such_dir"),
      Contains("scripts/fetch_data.sh"));
  // A directory without *ham* or *spam* folders.
  CHECK_THROWS_WITH(
      example::read_email_dir(kEmails + "/ham"), Contains("no e-mails"));
}

TEST_CASE(
    "Word vectors: numbers outside their types' range are refused",
    "[example][glove]") {
  // The first input is what tests/fuzz found ("dimensions" beyond int64:
  // an undefined conversion); the others are its neighbours.
  const std::vector<std::pair<std::string, std::string>> files = {
      {R"({"precision":8,"dimensions":388888888888888888888888888888888,)"
       R"("words":["the"],"vectors":{"the":[0.5,1]}})",
       "\"dimensions\" must be a whole number"},
      {R"({"dimensions":2.5,"vectors":{"the":[0.5,1,2]}})",
       "\"dimensions\" must be a whole number"},
      {R"({"dimensions":-3,"vectors":{"the":[0.5,1,2]}})",
       "\"dimensions\" must be a whole number"},
      {R"({"dimensions":2,"vectors":{"the":[1e300,1]}})",
       "outside float's range"}};
  const auto path =
      std::filesystem::temp_directory_path() / "advtrain-glove-range.json";
  for (const auto& [text, message] : files) {
    INFO(text);
    std::ofstream(path) << text;
    CHECK_THROWS_WITH(
        example::read_word_vectors(path.string(), {"the"}), Contains(message));
  }
  std::ofstream(path) << R"({"dimensions":2,"vectors":{"the":[0.5,1,7]}})";
  const auto ok = example::read_word_vectors(path.string(), {"the"});
  CHECK(ok.dimensions == 2);
  std::filesystem::remove(path);
}
