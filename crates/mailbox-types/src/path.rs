//! Mailbox paths and message names.
//!
//! A mailbox path is absolute (`/partners/acme/inbox`), made of non-empty
//! segments without `.`/`..`, NUL, control characters or backslashes, and is
//! at most [`MAX_PATH_LEN`] bytes. Because NUL can never occur in a path it is
//! safe as a separator in storage keys.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::TypesError;

/// Longest mailbox path accepted, in bytes.
pub const MAX_PATH_LEN: usize = 1024;
/// Longest message name accepted, in bytes.
pub const MAX_NAME_LEN: usize = 255;

/// A validated, normalised mailbox path.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct MailboxPath(String);

fn check_component(field: &'static str, s: &str) -> Result<(), TypesError> {
    if s.is_empty() {
        return Err(TypesError::invalid(field, "empty path segment"));
    }
    if s == "." || s == ".." {
        return Err(TypesError::invalid(
            field,
            format!("segment {s:?} is not allowed (no relative paths)"),
        ));
    }
    if let Some(c) = s.chars().find(|c| c.is_control() || *c == '\\') {
        return Err(TypesError::invalid(
            field,
            format!("contains forbidden character {c:?}"),
        ));
    }
    Ok(())
}

impl MailboxPath {
    /// Parses and validates a path. A single trailing slash is tolerated.
    pub fn parse(s: &str) -> Result<Self, TypesError> {
        const F: &str = "mailbox path";
        if s.len() > MAX_PATH_LEN {
            return Err(TypesError::invalid(
                F,
                format!("{} bytes is longer than {MAX_PATH_LEN}", s.len()),
            ));
        }
        if s.contains('\0') {
            return Err(TypesError::invalid(F, "contains NUL"));
        }
        let Some(rest) = s.strip_prefix('/') else {
            return Err(TypesError::invalid(F, format!("{s:?} must start with '/'")));
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.is_empty() {
            return Err(TypesError::invalid(F, "the root '/' is not a mailbox"));
        }
        for seg in rest.split('/') {
            check_component(F, seg)?;
        }
        Ok(MailboxPath(format!("/{rest}")))
    }

    /// The path as a string, always starting with `/` and never ending with one.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The parent mailbox, `None` for a top-level one.
    pub fn parent(&self) -> Option<MailboxPath> {
        let idx = self.0.rfind('/')?;
        (idx > 0).then(|| MailboxPath(self.0[..idx].to_string()))
    }

    /// This path and every ancestor, outermost first.
    pub fn ancestors_and_self(&self) -> Vec<MailboxPath> {
        let mut out = vec![self.clone()];
        let mut cur = self.parent();
        while let Some(p) = cur {
            cur = p.parent();
            out.push(p);
        }
        out.reverse();
        out
    }
}

impl fmt::Display for MailboxPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for MailboxPath {
    type Error = TypesError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        MailboxPath::parse(&s)
    }
}

impl From<MailboxPath> for String {
    fn from(p: MailboxPath) -> String {
        p.0
    }
}

/// Validates a message name: one path segment, 1..=255 bytes.
pub fn validate_message_name(name: &str) -> Result<(), TypesError> {
    const F: &str = "message name";
    if name.len() > MAX_NAME_LEN {
        return Err(TypesError::invalid(
            F,
            format!("{} bytes is longer than {MAX_NAME_LEN}", name.len()),
        ));
    }
    if name.contains('\0') {
        return Err(TypesError::invalid(F, "contains NUL"));
    }
    if name.contains('/') {
        return Err(TypesError::invalid(F, "must not contain '/'"));
    }
    check_component(F, name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_and_normalises() {
        assert_eq!(MailboxPath::parse("/inbox").unwrap().as_str(), "/inbox");
        assert_eq!(MailboxPath::parse("/a/b/").unwrap().as_str(), "/a/b");
        let p = MailboxPath::parse("/partners/acme/inbox").unwrap();
        let chain: Vec<_> = p
            .ancestors_and_self()
            .iter()
            .map(|p| p.to_string())
            .collect();
        assert_eq!(
            chain,
            ["/partners", "/partners/acme", "/partners/acme/inbox"]
        );
    }

    #[test]
    fn rejects_bad_paths() {
        let long = format!("/{}", "a".repeat(MAX_PATH_LEN));
        for bad in [
            "", "/", "inbox", "/a/../b", "/a/./b", "/a//b", "/a\0b", "/a\nb", "/a\\b", &long,
        ] {
            assert!(MailboxPath::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn names() {
        assert!(validate_message_name("invoice-1.edi").is_ok());
        assert!(validate_message_name(&"n".repeat(255)).is_ok());
        for bad in ["", ".", "..", "a/b", "a\0b", &"n".repeat(256)] {
            assert!(validate_message_name(bad).is_err(), "{bad:?} accepted");
        }
    }
}
