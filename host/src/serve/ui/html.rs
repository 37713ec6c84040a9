//! The UI's markup helpers: HTML escaping, URL encoding, and the frame every page shares.
//!
//! Pages are `format!` strings. What makes that safe is that every value from outside the
//! code (anything a tenant deployed or called with, anything a guest returned or raised)
//! goes into them through [`Esc`]; only markup written here and in `ui.rs` does not.

use std::fmt::{self, Display, Write};

/// A value written as HTML text: `&`, `<`, `>`, `"` and `'` become entities, so it is text
/// both between tags and inside a quoted attribute, whatever it holds.
pub struct Esc<T>(pub T);

impl<T: Display> Display for Esc<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = self.0.to_string();
        let mut rest = text.as_str();
        while let Some(at) = rest.find(['&', '<', '>', '"', '\'']) {
            f.write_str(&rest[..at])?;
            f.write_str(match rest.as_bytes()[at] {
                b'&' => "&amp;",
                b'<' => "&lt;",
                b'>' => "&gt;",
                b'"' => "&quot;",
                _ => "&#39;",
            })?;
            rest = &rest[at + 1..];
        }
        f.write_str(rest)
    }
}

/// `text` percent-encoded but for RFC 3986's unreserved characters: safe in a URL's query
/// and in a cookie's value.
pub fn encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// The text `encode` (or a browser's form encoding, where `+` is a space) made; None when
/// it is not percent-encoded UTF-8.
pub fn decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// A URL's query string (`?a=1&b=2`, or nothing) of the pairs that have a value.
pub fn query(pairs: &[(&str, Option<&str>)]) -> String {
    let mut out = String::new();
    for (key, value) in pairs {
        if let Some(value) = value {
            out.push(if out.is_empty() { '?' } else { '&' });
            let _ = write!(out, "{key}={}", encode(value));
        }
    }
    out
}

/// A whole page: `body` (markup) in the frame with the navigation, for `tenant` when one is
/// logged in. `refresh` reloads it every so many seconds (a running evaluation's page).
pub fn page(title: &str, tenant: Option<&str>, refresh: Option<u32>, body: &str) -> String {
    let nav = match tenant {
        Some(tenant) => format!(
            r#"<nav><a href="/ui/runs">Runs</a><a href="/ui/aliases">Aliases</a><a href="/ui/evaluations">Evaluations</a>
<span class="tenant">tenant <b>{}</b></span>
<form method="post" action="/ui/logout"><button type="submit">Log out</button></form></nav>"#,
            Esc(tenant)
        ),
        None => String::new(),
    };
    let refresh = refresh
        .map(|s| format!(r#"<meta http-equiv="refresh" content="{s}">"#))
        .unwrap_or_default();
    format!(
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">{refresh}
<title>{} · host</title><link rel="stylesheet" href="/ui/static/ui.css"><script src="/ui/static/ui.js" defer></script></head>
<body><header><a class="home" href="/ui/runs">host</a>{nav}</header>
<main>
{body}
</main></body></html>
"#,
        Esc(title)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markup_characters_become_entities_and_the_rest_stays() {
        assert_eq!(
            Esc(r#"<img src=x onerror="a('b')">&amp; é"#).to_string(),
            "&lt;img src=x onerror=&quot;a(&#39;b&#39;)&quot;&gt;&amp;amp; é"
        );
    }

    #[test]
    fn encoding_round_trips_and_bad_encodings_are_refused() {
        let text = "a b&c=d/é%+;\"";
        assert_eq!(decode(&encode(text)).as_deref(), Some(text));
        assert!(
            encode(text)
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.~%".contains(&b))
        );
        assert_eq!(decode("a+b%21").as_deref(), Some("a b!"));
        assert_eq!(decode("%zz"), None);
        assert_eq!(decode("%4"), None);
        assert_eq!(decode("%ff"), None, "not UTF-8");
    }

    #[test]
    fn a_query_has_only_the_pairs_with_values() {
        assert_eq!(
            query(&[
                ("function", Some("f g")),
                ("version", None),
                ("after", Some("1"))
            ]),
            "?function=f%20g&after=1"
        );
        assert_eq!(query(&[("a", None)]), "");
    }
}
