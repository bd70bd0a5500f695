#pragma once

// Raw RFC 822 e-mails to text: the Subject and the readable body, with MIME
// multiparts walked, base64 and quoted-printable decoded and HTML reduced to
// its text. The other headers are dropped (in the SpamAssassin corpus they
// name the collecting servers, which would give the label away). No LibTorch.

#include "dataset.h"

#include <algorithm>
#include <cctype>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

namespace example {
namespace mail {

inline std::string lower(std::string s) {
  for (auto& c : s) {
    c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  }
  return s;
}

inline std::string trim(const std::string& s) {
  const auto b = s.find_first_not_of(" \t\r\n");
  if (b == std::string::npos) {
    return "";
  }
  return s.substr(b, s.find_last_not_of(" \t\r\n") - b + 1);
}

/// Headers (names lower-cased, continuation lines unfolded) and body.
struct Message {
  std::map<std::string, std::string> headers;
  std::string body;

  std::string header(const std::string& name) const {
    const auto it = headers.find(name);
    return it == headers.end() ? std::string() : it->second;
  }
};

/// Splits at the first empty line. A first line "From ..." (the mbox
/// separator) is skipped; a text without headers is all body.
inline Message parse_message(const std::string& raw) {
  Message m;
  std::istringstream in(raw);
  std::string line, name;
  bool first = true;
  size_t consumed = 0;
  while (std::getline(in, line)) {
    consumed += line.size() + 1;
    if (!line.empty() && line.back() == '\r') {
      line.pop_back();
    }
    if (first && line.rfind("From ", 0) == 0) {
      first = false;
      continue;
    }
    first = false;
    if (line.empty()) {
      break;
    }
    if ((line[0] == ' ' || line[0] == '\t') && !name.empty()) {
      m.headers[name] += " " + trim(line);
      continue;
    }
    const auto colon = line.find(':');
    if (colon == std::string::npos || colon == 0 ||
        line.find(' ') < colon) { // not a header: the message has none
      return {{}, raw};
    }
    name = lower(line.substr(0, colon));
    m.headers[name] = trim(line.substr(colon + 1));
  }
  m.body = consumed < raw.size() ? raw.substr(consumed) : std::string();
  return m;
}

/// "text/html; charset=x; boundary=\"y\"" -> type "text/html" and the
/// parameters, names lower-cased and values unquoted.
struct ContentType {
  std::string type = "text/plain";
  std::map<std::string, std::string> params;
};

inline ContentType parse_content_type(const std::string& value) {
  ContentType ct;
  std::vector<std::string> parts;
  std::string cur;
  bool quoted = false;
  for (const char c : value) {
    if (c == '"') {
      quoted = !quoted;
    } else if (c == ';' && !quoted) {
      parts.push_back(cur);
      cur.clear();
      continue;
    }
    cur.push_back(c);
  }
  parts.push_back(cur);
  if (!trim(parts[0]).empty()) {
    ct.type = lower(trim(parts[0]));
  }
  for (size_t i = 1; i < parts.size(); ++i) {
    const auto eq = parts[i].find('=');
    if (eq == std::string::npos) {
      continue;
    }
    std::string v = trim(parts[i].substr(eq + 1));
    if (v.size() >= 2 && v.front() == '"' && v.back() == '"') {
      v = v.substr(1, v.size() - 2);
    }
    ct.params[lower(trim(parts[i].substr(0, eq)))] = v;
  }
  return ct;
}

inline int hex_value(char c) {
  if (c >= '0' && c <= '9') {
    return c - '0';
  }
  c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  if (c >= 'a' && c <= 'f') {
    return c - 'a' + 10;
  }
  return -1;
}

/// RFC 2045 quoted-printable: "=XX" bytes and "=" soft line breaks; a
/// malformed escape is kept as it is.
inline std::string decode_quoted_printable(const std::string& s) {
  std::string out;
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] != '=') {
      out.push_back(s[i]);
      continue;
    }
    if (i + 1 < s.size() && (s[i + 1] == '\n' || s[i + 1] == '\r')) {
      i += (s[i + 1] == '\r' && i + 2 < s.size() && s[i + 2] == '\n') ? 2 : 1;
      continue;
    }
    if (i + 2 < s.size() && hex_value(s[i + 1]) >= 0 &&
        hex_value(s[i + 2]) >= 0) {
      out.push_back(
          static_cast<char>(hex_value(s[i + 1]) * 16 + hex_value(s[i + 2])));
      i += 2;
      continue;
    }
    out.push_back('=');
  }
  return out;
}

/// RFC 4648 base64; characters outside the alphabet (line breaks) are
/// skipped and decoding stops at '='.
inline std::string decode_base64(const std::string& s) {
  auto value = [](char c) -> int {
    if (c >= 'A' && c <= 'Z') {
      return c - 'A';
    }
    if (c >= 'a' && c <= 'z') {
      return c - 'a' + 26;
    }
    if (c >= '0' && c <= '9') {
      return c - '0' + 52;
    }
    if (c == '+') {
      return 62;
    }
    if (c == '/') {
      return 63;
    }
    return -1;
  };
  std::string out;
  uint32_t acc = 0;
  int bits = 0;
  for (const char c : s) {
    if (c == '=') {
      break;
    }
    const int v = value(c);
    if (v < 0) {
      continue;
    }
    acc = (acc << 6) | static_cast<uint32_t>(v);
    bits += 6;
    if (bits >= 8) {
      bits -= 8;
      out.push_back(static_cast<char>((acc >> bits) & 0xFF));
    }
  }
  return out;
}

/// RFC 2047 encoded words in a header ("=?charset?B?...?=" and "?Q?"); the
/// bytes are kept as they are, whatever the charset.
inline std::string decode_header(const std::string& s) {
  std::string out;
  size_t i = 0;
  while (i < s.size()) {
    const auto start = s.find("=?", i);
    if (start == std::string::npos) {
      out += s.substr(i);
      break;
    }
    const auto q1 = s.find('?', start + 2);
    const auto q2 = q1 == std::string::npos ? q1 : s.find('?', q1 + 1);
    const auto end = q2 == std::string::npos ? q2 : s.find("?=", q2 + 1);
    if (end == std::string::npos || q2 != q1 + 2) {
      out += s.substr(i);
      break;
    }
    out += s.substr(i, start - i);
    const char enc = static_cast<char>(std::toupper(s[q1 + 1]));
    std::string word = s.substr(q2 + 1, end - q2 - 1);
    if (enc == 'B') {
      out += decode_base64(word);
    } else {
      std::replace(word.begin(), word.end(), '_', ' ');
      out += decode_quoted_printable(word);
    }
    i = end + 2;
  }
  return out;
}

/// HTML to text: tags dropped (a space in their place), script and style
/// elements and comments dropped whole, common entities decoded.
inline std::string html_to_text(const std::string& html) {
  std::string out;
  const std::string low = lower(html);
  size_t i = 0;
  while (i < html.size()) {
    if (html.compare(i, 4, "<!--") == 0) {
      const auto end = html.find("-->", i + 4);
      i = end == std::string::npos ? html.size() : end + 3;
      out.push_back(' ');
      continue;
    }
    if (html[i] == '<') {
      for (const char* skip : {"script", "style"}) {
        const std::string open = std::string("<") + skip;
        if (low.compare(i, open.size(), open) == 0) {
          const auto end = low.find(std::string("</") + skip, i);
          i = end == std::string::npos ? html.size() : end;
          break;
        }
      }
      const auto close = html.find('>', i);
      i = close == std::string::npos ? html.size() : close + 1;
      out.push_back(' ');
      continue;
    }
    if (html[i] == '&') {
      const auto semi = html.find(';', i);
      if (semi != std::string::npos && semi - i <= 8) {
        const std::string name = lower(html.substr(i + 1, semi - i - 1));
        static const std::map<std::string, std::string> kNamed = {
            {"amp", "&"},
            {"lt", "<"},
            {"gt", ">"},
            {"quot", "\""},
            {"apos", "'"},
            {"nbsp", " "}};
        const auto it = kNamed.find(name);
        if (it != kNamed.end()) {
          out += it->second;
          i = semi + 1;
          continue;
        }
        if (name.size() > 1 && name[0] == '#') {
          const bool hex = name[1] == 'x';
          const std::string digits = name.substr(hex ? 2 : 1);
          const bool ok =
              !digits.empty() &&
              std::all_of(digits.begin(), digits.end(), [&](char c) {
                return hex ? hex_value(c) >= 0
                           : std::isdigit(static_cast<unsigned char>(c));
              });
          if (ok) {
            const long code = std::stol(digits, nullptr, hex ? 16 : 10);
            out.push_back(
                code > 0 && code < 128 ? static_cast<char>(code) : ' ');
            i = semi + 1;
            continue;
          }
        }
      }
    }
    out.push_back(html[i]);
    ++i;
  }
  return out;
}

/// The readable text of a message or MIME part: text/plain as it is,
/// text/html reduced to text, multipart/alternative's plain part (else its
/// first readable one), the readable parts of other multiparts, a
/// message/rfc822 part's own text; nothing for attachments.
inline std::string body_text(const Message& m, int depth = 0) {
  const ContentType ct = parse_content_type(m.header("content-type"));
  const std::string cte = lower(trim(m.header("content-transfer-encoding")));
  std::string body = m.body;
  if (cte == "base64") {
    body = decode_base64(body);
  } else if (cte == "quoted-printable") {
    body = decode_quoted_printable(body);
  }
  if (depth > 8) {
    return "";
  }
  if (ct.type.rfind("multipart/", 0) == 0) {
    const auto b = ct.params.find("boundary");
    if (b == ct.params.end() || b->second.empty()) {
      return body;
    }
    const std::string delim = "--" + b->second;
    std::vector<Message> parts;
    size_t pos = body.find(delim);
    while (pos != std::string::npos) {
      size_t start = body.find('\n', pos);
      if (start == std::string::npos ||
          body.compare(pos + delim.size(), 2, "--") == 0) {
        break; // the closing delimiter
      }
      ++start;
      const size_t next = body.find("\n" + delim, start);
      const std::string part = body.substr(
          start, next == std::string::npos ? std::string::npos : next - start);
      parts.push_back(parse_message(part));
      pos = next == std::string::npos ? next : next + 1;
    }
    std::string out;
    if (ct.type == "multipart/alternative") {
      for (const auto& p : parts) {
        if (parse_content_type(p.header("content-type")).type == "text/plain") {
          return body_text(p, depth + 1);
        }
      }
      for (const auto& p : parts) {
        out = body_text(p, depth + 1);
        if (!trim(out).empty()) {
          return out;
        }
      }
      return out;
    }
    for (const auto& p : parts) {
      out += body_text(p, depth + 1) + "\n";
    }
    return out;
  }
  if (ct.type == "message/rfc822") {
    const Message inner = parse_message(body);
    return decode_header(inner.header("subject")) + "\n" +
           body_text(inner, depth + 1);
  }
  if (ct.type == "text/html") {
    return html_to_text(body);
  }
  if (ct.type.rfind("text/", 0) == 0) {
    return body;
  }
  return ""; // images, applications: not text
}

/// Subject and readable body of a raw e-mail.
inline std::string email_to_text(const std::string& raw) {
  const Message m = parse_message(raw);
  return decode_header(m.header("subject")) + "\n" + body_text(m);
}

inline std::string read_file(const std::filesystem::path& p) {
  std::ifstream in(p, std::ios::binary);
  if (!in) {
    throw std::runtime_error("cannot open '" + p.string() + "'");
  }
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

} // namespace mail

/// The e-mails under `dir`: every regular file in its subdirectories whose
/// name contains "spam" (class 1) or "ham" (class 0), in name order; files
/// ending ".json" (the npm package's copies) and "cmds" files are skipped.
inline std::vector<Sentence> read_email_dir(const std::string& dir) {
  namespace fs = std::filesystem;
  if (!fs::is_directory(dir)) {
    throw std::runtime_error(
        "'" + dir +
        "' is not a directory of e-mails (run scripts/fetch_data.sh to "
        "download the SpamAssassin corpus)");
  }
  std::vector<std::pair<fs::path, int64_t>> files;
  for (const auto& sub : fs::directory_iterator(dir)) {
    if (!sub.is_directory()) {
      continue;
    }
    const std::string name = mail::lower(sub.path().filename().string());
    const int64_t label = name.find("spam") != std::string::npos  ? 1
                          : name.find("ham") != std::string::npos ? 0
                                                                  : -1;
    if (label < 0) {
      continue;
    }
    for (const auto& f : fs::directory_iterator(sub.path())) {
      const std::string fname = f.path().filename().string();
      if (f.is_regular_file() && f.path().extension() != ".json" &&
          fname != "cmds") {
        files.emplace_back(f.path(), label);
      }
    }
  }
  if (files.empty()) {
    throw std::runtime_error(
        "no e-mails under '" + dir +
        "': expected subdirectories named *ham* and *spam*");
  }
  std::sort(files.begin(), files.end());
  std::vector<Sentence> out;
  for (const auto& [path, label] : files) {
    std::string text = mail::email_to_text(mail::read_file(path));
    if (!mail::trim(text).empty()) {
      out.push_back({std::move(text), label});
    }
  }
  return out;
}

} // namespace example
