//! Accounts: users (partners and admins), their SSH keys, bearer tokens and
//! grants on mailboxes, as replicated cluster configuration.
//!
//! Pure data and the decisions every door shares, so SFTP, FTP, HTTP and
//! gRPC answer alike:
//! - a user sees the mailbox tree from their *virtual root*: the path `/x`
//!   they name is `root/x` in the cluster, and nothing can name a mailbox
//!   outside it (paths are validated: no `.`/`..` segments);
//! - what a user may do on a mailbox is decided by the **nearest** grant:
//!   one on the mailbox itself, else the closest one on an ancestor, which
//!   allows what it says if it covers sub-mailboxes and nothing if it does
//!   not (it does not let a farther grant through). A nearer grant can so
//!   narrow what a wider one allows. `all` includes `admin`. Admins (the
//!   role) may do everything;
//! - grants and tokens name the user *incarnation* they were made for
//!   (the user's creation stamp): deleting a user and creating one of the
//!   same name does not revive the old grants or tokens.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::{Digest, MailboxPath, TypesError};

/// Longest user name, in bytes.
pub const MAX_USER_NAME: usize = 64;
/// SSH public keys per user at most.
pub const MAX_SSH_KEYS: usize = 32;

/// Checks a user name: 1 to [`MAX_USER_NAME`] of `a-z 0-9 . _ -`, starting
/// with a letter or digit (names end up in logs, paths and URLs).
pub fn validate_user_name(name: &str) -> Result<(), TypesError> {
    const F: &str = "user name";
    if name.is_empty() || name.len() > MAX_USER_NAME {
        return Err(TypesError::invalid(
            F,
            format!("must be 1 to {MAX_USER_NAME} characters"),
        ));
    }
    if !name.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit()) {
        return Err(TypesError::invalid(
            F,
            format!("{name:?} must start with a lowercase letter or digit"),
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(*c)))
    {
        return Err(TypesError::invalid(
            F,
            format!("{name:?} contains {c:?} (allowed: a-z 0-9 . _ -)"),
        ));
    }
    Ok(())
}

/// What a user is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum Role {
    /// A trading partner: may do what grants allow, within the virtual root.
    #[default]
    Partner,
    /// A cluster admin: every operation on every mailbox, and account
    /// management.
    Admin,
}

impl Role {
    /// Parses `partner` or `admin`.
    pub fn parse(s: &str) -> Result<Self, TypesError> {
        match s {
            "partner" => Ok(Role::Partner),
            "admin" => Ok(Role::Admin),
            _ => Err(TypesError::invalid(
                "role",
                format!("{s:?} (expected partner or admin)"),
            )),
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Partner => "partner",
            Role::Admin => "admin",
        })
    }
}

/// Operations a grant allows, as a set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Perms(u8);

impl Perms {
    /// See the mailbox and list what is in it.
    pub const LIST: Perms = Perms(1);
    /// Upload messages into it.
    pub const UPLOAD: Perms = Perms(2);
    /// Download its messages.
    pub const DOWNLOAD: Perms = Perms(4);
    /// Delete (and rename) its messages.
    pub const DELETE: Perms = Perms(8);
    /// Create sub-mailboxes.
    pub const CREATE: Perms = Perms(16);
    /// Everything on it, and granting on it.
    pub const ADMIN: Perms = Perms(32);
    /// Nothing.
    pub const NONE: Perms = Perms(0);

    const NAMES: [(&'static str, Perms); 6] = [
        ("list", Perms::LIST),
        ("upload", Perms::UPLOAD),
        ("download", Perms::DOWNLOAD),
        ("delete", Perms::DELETE),
        ("create", Perms::CREATE),
        ("admin", Perms::ADMIN),
    ];

    /// Whether every operation of `other` is allowed (admin allows all).
    pub fn allows(self, other: Perms) -> bool {
        self.0 & Perms::ADMIN.0 != 0 || self.0 & other.0 == other.0
    }

    /// Both sets together.
    pub fn union(self, other: Perms) -> Perms {
        Perms(self.0 | other.0)
    }

    /// Whether the set is empty.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// Parses a comma-separated list (`list,upload`), or `all`.
    pub fn parse(s: &str) -> Result<Perms, TypesError> {
        let mut p = Perms::NONE;
        for part in s.split(',').map(str::trim).filter(|x| !x.is_empty()) {
            if part == "all" {
                p = p.union(Perms(63));
                continue;
            }
            match Perms::NAMES.iter().find(|(n, _)| *n == part) {
                Some((_, q)) => p = p.union(*q),
                None => {
                    return Err(TypesError::invalid(
                        "permission",
                        format!(
                            "{part:?} (expected a comma-separated list of list, upload, download, delete, create, admin, or all)"
                        ),
                    ))
                }
            }
        }
        if p.is_empty() {
            return Err(TypesError::invalid("permission", "no permission named"));
        }
        Ok(p)
    }
}

impl fmt::Display for Perms {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = Perms::NAMES
            .iter()
            .filter(|(_, q)| self.0 & q.0 != 0)
            .map(|(n, _)| *n)
            .collect();
        f.write_str(&names.join(","))
    }
}

/// An SSH public key as OpenSSH writes it (`ssh-ed25519 AAAA… comment`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SshKey {
    /// Algorithm name (`ssh-ed25519`, `ecdsa-sha2-nistp256`, `ssh-rsa`, …).
    pub algorithm: String,
    /// The key blob (base64 in the text form), as the SSH wire carries it.
    pub blob: Vec<u8>,
    /// The comment, if any.
    pub comment: String,
}

impl SshKey {
    /// Parses one line of an `authorized_keys`/`.pub` file (no options).
    /// The blob must decode and name the same algorithm as the line, one
    /// of [`SshKey::ALGORITHMS`]; one key per text, control characters
    /// refused.
    pub fn parse(text: &str) -> Result<SshKey, TypesError> {
        use base64::Engine as _;
        const F: &str = "SSH public key";
        let mut lines = text.lines().filter(|l| !l.trim().is_empty());
        let line = lines.next().unwrap_or("");
        if lines.next().is_some() {
            return Err(TypesError::invalid(
                F,
                "one key at a time (the text has several lines)",
            ));
        }
        if line.chars().any(|c| c.is_control() && c != '\t') {
            return Err(TypesError::invalid(F, "contains control characters"));
        }
        let mut parts = line.split_whitespace();
        let (Some(algorithm), Some(b64)) = (parts.next(), parts.next()) else {
            return Err(TypesError::invalid(
                F,
                "expected \"<algorithm> <base64> [comment]\", as in a .pub file",
            ));
        };
        if !SshKey::ALGORITHMS.contains(&algorithm) {
            return Err(TypesError::invalid(
                F,
                format!(
                    "{algorithm:?} is not accepted (accepted: {})",
                    SshKey::ALGORITHMS.join(", ")
                ),
            ));
        }
        let comment = parts.collect::<Vec<_>>().join(" ");
        let blob = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|e| TypesError::invalid(F, format!("the key is not base64: {e}")))?;
        // The blob starts with its algorithm name as an SSH string.
        let named = blob
            .get(..4)
            .map(|l| u32::from_be_bytes(l.try_into().expect("4 bytes")) as usize)
            .and_then(|n| blob.get(4..4 + n));
        if named != Some(algorithm.as_bytes()) {
            return Err(TypesError::invalid(
                F,
                format!("the key's blob is not an {algorithm} key"),
            ));
        }
        Ok(SshKey {
            algorithm: algorithm.to_string(),
            blob,
            comment,
        })
    }

    /// Key algorithms accepted (OpenSSH's current ones; not `ssh-dss`).
    pub const ALGORITHMS: [&'static str; 7] = [
        "ssh-ed25519",
        "ecdsa-sha2-nistp256",
        "ecdsa-sha2-nistp384",
        "ecdsa-sha2-nistp521",
        "ssh-rsa",
        "sk-ssh-ed25519@openssh.com",
        "sk-ecdsa-sha2-nistp256@openssh.com",
    ];

    /// SHA-256 fingerprint as OpenSSH prints it (`SHA256:…`, no padding).
    pub fn fingerprint(&self) -> String {
        use base64::Engine as _;
        use sha2::Digest as _;
        let d = sha2::Sha256::digest(&self.blob);
        format!(
            "SHA256:{}",
            base64::engine::general_purpose::STANDARD_NO_PAD.encode(d)
        )
    }
}

/// A user (partner or admin).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    /// Login name.
    pub name: String,
    /// Partner or admin.
    pub role: Role,
    /// The password's argon2id hash in PHC form; `None`: no password login.
    pub password_hash: Option<String>,
    /// Public keys accepted for SSH login.
    pub ssh_keys: Vec<SshKey>,
    /// The mailbox this user sees as `/`; `None`: the whole tree.
    pub root: Option<MailboxPath>,
    /// Refuses every login while set.
    pub disabled: bool,
    /// This incarnation of the name (derived from `created`): grants and
    /// tokens made for it name it, and do not apply to a later user of the
    /// same name. In an update: the incarnation it was made from.
    pub incarnation: u64,
    /// When and where this incarnation was created (set by the state
    /// machine): of two incarnations, the later created wins everywhere.
    pub created: crate::Stamp,
}

/// A grant of operations to a user on a mailbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    /// The user.
    pub user: String,
    /// The user's incarnation it was made for.
    pub incarnation: u64,
    /// The mailbox (a cluster path, not relative to the user's root).
    pub mailbox: MailboxPath,
    /// What is allowed.
    pub perms: Perms,
    /// Whether it applies to the sub-mailboxes too (the default).
    pub subtree: bool,
}

/// A bearer token for the HTTP API. The secret is shown once, when it is
/// made; only its SHA-256 is kept.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Token {
    /// Public id (the part before the secret in `mbx_<id>_<secret>`).
    pub id: String,
    /// Whose.
    pub user: String,
    /// The user's incarnation it was made for.
    pub incarnation: u64,
    /// SHA-256 of the secret part.
    pub secret_sha256: Digest,
    /// What it is for (shown in listings).
    pub label: String,
    /// When it was made, ms since the epoch.
    pub created_ms: i64,
    /// When it stops working, ms since the epoch; `None`: never.
    pub expires_ms: Option<i64>,
}

/// One account record's name in the replicated configuration.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum AccountKey {
    /// A user, by name.
    User(String),
    /// A user's grant on a mailbox.
    Grant(String, MailboxPath),
    /// A token, by id.
    Token(String),
}

/// One account record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AccountValue {
    /// A user.
    User(User),
    /// A grant.
    Grant(Grant),
    /// A token.
    Token(Token),
}

impl AccountValue {
    /// The key this value is stored under.
    pub fn key(&self) -> AccountKey {
        match self {
            AccountValue::User(u) => AccountKey::User(u.name.clone()),
            AccountValue::Grant(g) => AccountKey::Grant(g.user.clone(), g.mailbox.clone()),
            AccountValue::Token(t) => AccountKey::Token(t.id.clone()),
        }
    }

    /// Checks what a client could have got wrong.
    pub fn validate(&self) -> Result<(), TypesError> {
        match self {
            AccountValue::User(u) => {
                validate_user_name(&u.name)?;
                if u.ssh_keys.len() > MAX_SSH_KEYS {
                    return Err(TypesError::invalid(
                        "SSH public keys",
                        format!("{MAX_SSH_KEYS} per user at most"),
                    ));
                }
                if let Some(h) = &u.password_hash {
                    if !h.starts_with("$argon2id$") {
                        return Err(TypesError::invalid(
                            "password hash",
                            "not an argon2id hash in PHC form",
                        ));
                    }
                }
                Ok(())
            }
            AccountValue::Grant(g) => {
                validate_user_name(&g.user)?;
                if g.perms.is_empty() {
                    return Err(TypesError::invalid("grant", "grants nothing"));
                }
                Ok(())
            }
            AccountValue::Token(t) => {
                validate_user_name(&t.user)?;
                if t.id.is_empty()
                    || t.id.len() > 32
                    || !t.id.chars().all(|c| c.is_ascii_alphanumeric())
                {
                    return Err(TypesError::invalid("token id", "1 to 32 letters or digits"));
                }
                Ok(())
            }
        }
    }
}

/// The cluster path of `user_path` (a path as the user names it, `/` being
/// their virtual root; `None` for the tree's root, which is no mailbox).
/// Nothing outside the root can be named: the user's path is a validated
/// absolute path (no `.`/`..` segments), appended to the root.
pub fn resolve_path(
    root: Option<&MailboxPath>,
    user_path: &str,
) -> Result<Option<MailboxPath>, TypesError> {
    let trimmed = user_path.trim_end_matches('/');
    if trimmed.is_empty() && user_path.starts_with('/') {
        return Ok(root.cloned());
    }
    let p = MailboxPath::parse(user_path)?;
    Ok(Some(match root {
        None => p,
        Some(r) => MailboxPath::parse(&format!("{}{}", r.as_str(), p.as_str()))?,
    }))
}

/// The path `cluster_path` has in the view of a user rooted at `root`;
/// `None` when it lies outside the root.
pub fn user_view(root: Option<&MailboxPath>, cluster_path: &MailboxPath) -> Option<String> {
    let Some(root) = root else {
        return Some(cluster_path.as_str().to_string());
    };
    let rest = cluster_path.as_str().strip_prefix(root.as_str())?;
    match rest {
        "" => Some("/".to_string()),
        r if r.starts_with('/') => Some(r.to_string()),
        _ => None,
    }
}

/// What `user` may do on `mailbox`, from the user's grants (any order):
/// the nearest grant decides (see the module docs). Grants of another
/// incarnation do not count. Admins may do everything.
pub fn effective_perms(user: &User, grants: &[Grant], mailbox: &MailboxPath) -> Perms {
    if user.role == Role::Admin {
        return Perms::ADMIN;
    }
    // Outside the virtual root nothing is allowed, whatever a grant says.
    if user_view(user.root.as_ref(), mailbox).is_none() {
        return Perms::NONE;
    }
    let mine = |g: &&Grant| g.user == user.name && g.incarnation == user.incarnation;
    if let Some(g) = grants.iter().filter(mine).find(|g| g.mailbox == *mailbox) {
        return g.perms;
    }
    // Nearest ancestor first.
    let mut ancestors = mailbox.ancestors_and_self();
    ancestors.retain(|a| a != mailbox);
    ancestors.sort_by_key(|a| std::cmp::Reverse(a.as_str().len()));
    for a in ancestors {
        if let Some(g) = grants.iter().filter(mine).find(|g| g.mailbox == a) {
            return if g.subtree { g.perms } else { Perms::NONE };
        }
    }
    Perms::NONE
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mb(s: &str) -> MailboxPath {
        MailboxPath::parse(s).unwrap()
    }

    fn user(root: &str) -> User {
        User {
            name: "acme".into(),
            role: Role::Partner,
            password_hash: None,
            ssh_keys: vec![],
            root: Some(mb(root)),
            disabled: false,
            incarnation: 7,
            created: Default::default(),
        }
    }

    fn grant(path: &str, perms: &str, subtree: bool) -> Grant {
        Grant {
            user: "acme".into(),
            incarnation: 7,
            mailbox: mb(path),
            perms: Perms::parse(perms).unwrap(),
            subtree,
        }
    }

    #[test]
    fn the_nearest_grant_decides_and_nothing_outside_the_root() {
        let u = user("/partners/acme");
        let gs = vec![
            grant("/partners/acme", "list,download", true),
            grant("/partners/acme/inbox", "list,upload", true),
            grant("/partners/acme/private", "list", false),
            // A grant outside the root is worth nothing.
            grant("/partners/other", "all", true),
        ];
        let p = |s: &str| effective_perms(&u, &gs, &mb(s));
        assert_eq!(
            p("/partners/acme/inbox/2026"),
            Perms::parse("list,upload").unwrap()
        );
        assert!(
            !p("/partners/acme/inbox").allows(Perms::DOWNLOAD),
            "narrowed"
        );
        assert!(p("/partners/acme/outbox").allows(Perms::DOWNLOAD));
        assert!(p("/partners/acme/private").allows(Perms::LIST));
        assert_eq!(
            p("/partners/acme/private/sub"),
            Perms::NONE,
            "not inherited"
        );
        assert_eq!(p("/partners/other"), Perms::NONE);
        assert_eq!(p("/partners"), Perms::NONE);
        // Another incarnation's grants (a deleted user of the same name).
        let mut again = u.clone();
        again.incarnation = 8;
        assert_eq!(
            effective_perms(&again, &gs, &mb("/partners/acme")),
            Perms::NONE
        );
        let mut admin = u;
        admin.role = Role::Admin;
        assert!(effective_perms(&admin, &[], &mb("/x")).allows(Perms::DELETE));
    }

    #[test]
    fn a_user_cannot_name_a_path_outside_the_root() {
        let root = mb("/partners/acme");
        let r = Some(&root);
        assert_eq!(
            resolve_path(r, "/inbox").unwrap(),
            Some(mb("/partners/acme/inbox"))
        );
        assert_eq!(resolve_path(r, "/").unwrap(), Some(root.clone()));
        assert_eq!(resolve_path(None, "/").unwrap(), None);
        assert_eq!(resolve_path(None, "/x").unwrap(), Some(mb("/x")));
        for bad in [
            "/../other",
            "/inbox/../../x",
            "inbox",
            "/./x",
            "/a\\b",
            "",
            "..",
        ] {
            assert!(resolve_path(r, bad).is_err(), "{bad}");
        }
        assert_eq!(
            user_view(r, &mb("/partners/acme/inbox")).as_deref(),
            Some("/inbox")
        );
        assert_eq!(user_view(r, &mb("/partners/acme")).as_deref(), Some("/"));
        assert_eq!(user_view(r, &mb("/partners/acmex")), None);
        assert_eq!(user_view(r, &mb("/partners")), None);
        assert_eq!(
            user_view(None, &mb("/partners")).as_deref(),
            Some("/partners")
        );
    }

    #[test]
    fn names_permissions_and_keys_are_checked() {
        assert!(validate_user_name("demo").is_ok());
        assert!(validate_user_name("a.b-c_1").is_ok());
        for bad in ["", "Demo", "-x", "a b", "a/b", &"x".repeat(65)] {
            assert!(validate_user_name(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            Perms::parse("list, upload").unwrap().to_string(),
            "list,upload"
        );
        assert!(Perms::parse("lsit")
            .unwrap_err()
            .to_string()
            .contains("lsit"));
        assert!(Perms::parse("").is_err());
        assert!(Perms::parse("all").unwrap().allows(Perms::CREATE));
        // A real ed25519 public key (OpenSSH's test key format).
        let line = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl demo@host";
        let k = SshKey::parse(line).unwrap();
        assert_eq!(k.algorithm, "ssh-ed25519");
        assert_eq!(k.comment, "demo@host");
        assert!(k.fingerprint().starts_with("SHA256:"));
        // The line names another algorithm than its blob.
        let wrong = line.replacen("ssh-ed25519", "ssh-rsa", 1);
        assert!(SshKey::parse(&wrong).is_err());
        assert!(SshKey::parse("ssh-ed25519 !!!").is_err());
        // Trailing newline fine; two keys, escapes or DSA refused.
        assert!(SshKey::parse(&format!("{line}\n")).is_ok());
        assert!(SshKey::parse(&format!("{line}\n{line}\n")).is_err());
        assert!(SshKey::parse(&format!("{line} \u{1b}[2J")).is_err());
        assert!(SshKey::parse("ssh-dss AAAAB3NzaC1kc3MAAAA= old").is_err());
        assert!(SshKey::parse("garbage").is_err());
    }
}
