//! Mailbox path patterns for per-mailbox rules (acknowledgement policy,
//! event rules) and message-name globs for event rules.
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

/// A message-name glob of an event rule: `*` (any run of characters), `?`
/// (one character), `[abc]`, `[a-z]` and `[!x]` (one character of a set or
/// outside it), `\\` escapes the next character. Matched against the whole
/// name, case-sensitively.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NameGlob {
    text: String,
}

/// Longest name glob accepted, in bytes.
pub const MAX_GLOB_LEN: usize = 256;

impl NameGlob {
    /// Parses a glob; an unclosed `[`, an empty set or a trailing `\\` is
    /// an error that says where.
    pub fn parse(s: &str) -> Result<Self, TypesError> {
        const F: &str = "name pattern";
        if s.is_empty() {
            return Err(TypesError::invalid(F, "empty pattern"));
        }
        if s.len() > MAX_GLOB_LEN {
            return Err(TypesError::invalid(
                F,
                format!("{} bytes is longer than {MAX_GLOB_LEN}", s.len()),
            ));
        }
        if s.contains('\0') || s.contains('/') {
            return Err(TypesError::invalid(
                F,
                format!("{s:?}: a name pattern has no '/' or NUL"),
            ));
        }
        let chars: Vec<char> = s.chars().collect();
        let mut i = 0;
        while i < chars.len() {
            match chars[i] {
                '\\' if i + 1 == chars.len() => {
                    return Err(TypesError::invalid(
                        F,
                        format!("{s:?}: ends with a lone '\\'"),
                    ))
                }
                '\\' => i += 2,
                '[' => {
                    let Some(end) = class_end(&chars, i) else {
                        return Err(TypesError::invalid(
                            F,
                            format!("{s:?}: '[' at character {} is never closed", i + 1),
                        ));
                    };
                    i = end + 1;
                }
                _ => i += 1,
            }
        }
        Ok(NameGlob {
            text: s.to_string(),
        })
    }

    /// Whether the whole of `name` matches.
    pub fn matches(&self, name: &str) -> bool {
        let pat: Vec<char> = self.text.chars().collect();
        let s: Vec<char> = name.chars().collect();
        glob_chars(&pat, &s)
    }

    /// The glob as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl fmt::Display for NameGlob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// Index of the `]` closing the set that opens at `open`; a `]` right
/// after `[` or `[!` is a member, not the end, and a set has one member
/// at least.
fn class_end(p: &[char], open: usize) -> Option<usize> {
    let mut i = open + 1;
    if p.get(i) == Some(&'!') {
        i += 1;
    }
    // The first member may be ']'.
    i += 1;
    while i < p.len() {
        if p[i] == ']' {
            return Some(i);
        }
        i += 1;
    }
    None
}

fn class_matches(set: &[char], c: char) -> bool {
    let (negate, set) = match set.split_first() {
        Some(('!', rest)) => (true, rest),
        _ => (false, set),
    };
    let mut hit = false;
    let mut i = 0;
    while i < set.len() {
        if i + 2 < set.len() && set[i + 1] == '-' {
            hit |= set[i] <= c && c <= set[i + 2];
            i += 3;
        } else {
            hit |= set[i] == c;
            i += 1;
        }
    }
    hit != negate
}

/// One pattern element: what matches a single character, or a star.
enum Tok<'a> {
    Star,
    Any,
    Lit(char),
    Class(&'a [char]),
}

fn tokens(p: &[char]) -> Vec<Tok<'_>> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < p.len() {
        match p[i] {
            '*' => {
                // Runs of stars match like one.
                if !matches!(out.last(), Some(Tok::Star)) {
                    out.push(Tok::Star);
                }
                i += 1;
            }
            '?' => {
                out.push(Tok::Any);
                i += 1;
            }
            '[' => match class_end(p, i) {
                Some(end) => {
                    out.push(Tok::Class(&p[i + 1..end]));
                    i = end + 1;
                }
                None => {
                    out.push(Tok::Lit('['));
                    i += 1;
                }
            },
            '\\' if i + 1 < p.len() => {
                out.push(Tok::Lit(p[i + 1]));
                i += 2;
            }
            c => {
                out.push(Tok::Lit(c));
                i += 1;
            }
        }
    }
    out
}

/// Whole-string glob match in O(pattern × name) time: on a mismatch only
/// the last star takes one more character (earlier stars never need to,
/// as each star matches any run), so no pattern can make matching
/// exponential, which matters because rules are matched inside apply.
fn glob_chars(p: &[char], s: &[char]) -> bool {
    let toks = tokens(p);
    let one = |t: &Tok<'_>, c: char| match t {
        Tok::Any => true,
        Tok::Lit(l) => *l == c,
        Tok::Class(set) => class_matches(set, c),
        Tok::Star => false,
    };
    let (mut ti, mut si) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while si < s.len() {
        if ti < toks.len() && matches!(toks[ti], Tok::Star) {
            star = Some((ti, si));
            ti += 1;
        } else if ti < toks.len() && one(&toks[ti], s[si]) {
            ti += 1;
            si += 1;
        } else if let Some((st, ss)) = star {
            ti = st + 1;
            si = ss + 1;
            star = Some((st, ss + 1));
        } else {
            return false;
        }
    }
    toks[ti..].iter().all(|t| matches!(t, Tok::Star))
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
    fn name_globs() {
        let g = |p: &str, n: &str| NameGlob::parse(p).unwrap().matches(n);
        assert!(g("*.csv", "report.csv"));
        assert!(!g("*.csv", "report.csv.tmp"));
        assert!(g("INV_????.edi", "INV_0042.edi"));
        assert!(!g("INV_????.edi", "INV_042.edi"));
        assert!(g("[a-c]*", "bank"));
        assert!(!g("[a-c]*", "dank"));
        assert!(g("[!.]*", "x.tmp"));
        assert!(!g("[!.]*", ".hidden"));
        assert!(g("[]]x", "]x"));
        assert!(g("a\\*b", "a*b"));
        assert!(!g("a\\*b", "axb"));
        assert!(g("**", ""));
        assert!(g("*", "anything at all"));
        assert!(g("a*b*c", "axxbyyc"));
        assert!(!g("a*b*c", "axxbyy"));
        assert!(g("*.csv", ".csv"));
        assert!(g("*a?", "bab"));
    }

    #[test]
    fn a_hostile_glob_matches_in_linear_time() {
        // Backtracking would take exponential time here; rules are matched
        // inside apply, so this must stay fast.
        let pat = format!("{}b", "*a".repeat(120));
        let name = "a".repeat(255);
        let t = std::time::Instant::now();
        assert!(!NameGlob::parse(&pat).unwrap().matches(&name));
        assert!(t.elapsed() < std::time::Duration::from_secs(1));
    }

    #[test]
    fn bad_name_globs() {
        for p in [
            "",
            "[abc",
            "a\\",
            "x/y",
            "[!",
            &"a".repeat(MAX_GLOB_LEN + 1),
        ] {
            let e = NameGlob::parse(p).unwrap_err().to_string();
            assert!(e.contains("name pattern"), "{p:?}: {e}");
        }
        assert!(NameGlob::parse("[abc")
            .unwrap_err()
            .to_string()
            .contains("never closed"));
    }

    #[test]
    fn bad_patterns() {
        for p in ["inbox", "/a//b", "/a/**x", "/a\0"] {
            assert!(PathPattern::parse(p).is_err(), "{p:?}");
        }
    }
}
