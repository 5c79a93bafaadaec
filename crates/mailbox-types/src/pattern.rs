//! Mailbox path patterns for per-mailbox rules (acknowledgement policy now,
//! event rules later).
//!
//! A pattern is an absolute path whose segments may use `*` (any run of
//! characters within one segment) and `?` (one character), or be `**`
//! (any number of whole segments, none included). `/partners/*/inbox`
//! matches `/partners/acme/inbox`; `/partners/**` matches `/partners` and
//! everything below it.

use std::fmt;

use crate::{MailboxPath, TypesError};

/// A parsed mailbox path pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathPattern {
    text: String,
    segments: Vec<String>,
}

impl PathPattern {
    /// Parses a pattern; it must be absolute and have no empty segments.
    pub fn parse(s: &str) -> Result<Self, TypesError> {
        let Some(rest) = s.strip_prefix('/') else {
            return Err(TypesError::invalid(
                "mailbox pattern",
                format!("{s:?} must start with /"),
            ));
        };
        let segments: Vec<String> = if rest.is_empty() {
            Vec::new()
        } else {
            rest.split('/').map(String::from).collect()
        };
        if let Some(bad) = segments.iter().find(|seg| {
            seg.is_empty() || seg.contains('\0') || (seg.contains("**") && *seg != "**")
        }) {
            return Err(TypesError::invalid(
                "mailbox pattern",
                format!("{s:?} has a bad segment {bad:?} (empty, NUL, or ** mixed with other characters)"),
            ));
        }
        Ok(PathPattern {
            text: s.to_string(),
            segments,
        })
    }

    /// Whether `path` matches.
    pub fn matches(&self, path: &MailboxPath) -> bool {
        let p = path.as_str().trim_start_matches('/');
        let parts: Vec<&str> = if p.is_empty() {
            Vec::new()
        } else {
            p.split('/').collect()
        };
        let pat: Vec<&str> = self.segments.iter().map(String::as_str).collect();
        match_segments(&pat, &parts)
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl fmt::Display for PathPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

fn match_segments(pat: &[&str], path: &[&str]) -> bool {
    match pat.split_first() {
        None => path.is_empty(),
        Some((&"**", rest)) => (0..=path.len()).any(|skip| match_segments(rest, &path[skip..])),
        Some((seg, rest)) => match path.split_first() {
            Some((p, prest)) => {
                match_glob(seg.as_bytes(), p.as_bytes()) && match_segments(rest, prest)
            }
            None => false,
        },
    }
}

/// `*` and `?` within one segment.
fn match_glob(pat: &[u8], s: &[u8]) -> bool {
    match pat.split_first() {
        None => s.is_empty(),
        Some((b'*', rest)) => (0..=s.len()).any(|i| match_glob(rest, &s[i..])),
        Some((b'?', rest)) => !s.is_empty() && match_glob(rest, &s[1..]),
        Some((c, rest)) => s.first() == Some(c) && match_glob(rest, &s[1..]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(pat: &str, path: &str) -> bool {
        PathPattern::parse(pat)
            .unwrap()
            .matches(&MailboxPath::parse(path).unwrap())
    }

    #[test]
    fn globs() {
        assert!(m("/partners/*/inbox", "/partners/acme/inbox"));
        assert!(!m("/partners/*/inbox", "/partners/acme/x/inbox"));
        assert!(!m("/partners/*/inbox", "/partners/acme"));
        assert!(m("/partners/**", "/partners"));
        assert!(m("/partners/**", "/partners/a/b/c"));
        assert!(!m("/partners/**", "/partnersx"));
        assert!(m("/**/urgent", "/a/b/urgent"));
        assert!(m("/**/urgent", "/urgent"));
        assert!(m("/in?", "/in1"));
        assert!(!m("/in?", "/in"));
        assert!(m("/bank-*", "/bank-of-x"));
        assert!(m("/inbox", "/inbox"));
        assert!(!m("/inbox", "/inbox/sub"));
    }

    #[test]
    fn bad_patterns() {
        for p in ["inbox", "/a//b", "/a/**x", "/a\0"] {
            assert!(PathPattern::parse(p).is_err(), "{p:?}");
        }
    }
}
