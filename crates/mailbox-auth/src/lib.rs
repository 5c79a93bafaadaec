//! Accounts at the doors: who is logging in, and what they may do.
//!
//! Every door (SFTP, FTP, HTTP, gRPC) calls the same [`Authenticator`], so
//! a partner gets the same answer whichever way they come in:
//! - passwords are checked against argon2id hashes (in a blocking task:
//!   one check costs tens of milliseconds of CPU); SSH keys by their blob;
//!   bearer tokens (`mbx_<id>_<secret>`) by the SHA-256 of the secret,
//!   compared in constant time;
//! - an unknown user, a wrong password, a disabled user and an unknown key
//!   all answer the same [`AuthError::Failed`], after the same work (an
//!   unknown user's password is checked against a dummy hash);
//! - failed logins are slowed, per user and per source address apart
//!   ([`Throttle`]): each failure in the window doubles the wait before
//!   the next answer to that user or address, up to a cap. Nothing is
//!   locked out, and other users and addresses are not slowed. Each
//!   failure is logged with its real reason (never the password);
//! - a [`Principal`] is what a login yields: the user and their grants at
//!   that moment, with the permission checks of
//!   [`mailbox_types::account`] (virtual root, nearest grant).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use mailbox_state::KvRead;
use mailbox_types::account::{
    effective_perms, resolve_path, user_view, validate_user_name, Grant, Perms, Role, Token, User,
};
use mailbox_types::{Digest, MailboxPath};

/// Errors of authentication and permission checks.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// Wrong user, password, key or token: deliberately not saying which.
    #[error("authentication failed")]
    Failed,
    /// The operation is not granted on the mailbox (or it is outside the
    /// user's root).
    #[error("permission denied: {op} on {path}")]
    Denied {
        /// The operation.
        op: String,
        /// The path as the user named it.
        path: String,
    },
    /// A path the user named is not valid.
    #[error("{reason}")]
    BadPath {
        /// Why.
        reason: String,
    },
    /// The account records could not be read.
    #[error("reading accounts: {reason}")]
    Internal {
        /// Details.
        reason: String,
    },
}

impl AuthError {
    /// Stable code for clients.
    pub fn code(&self) -> &'static str {
        match self {
            AuthError::Failed => "unauthenticated",
            AuthError::Denied { .. } => "permission_denied",
            AuthError::BadPath { .. } => "invalid_argument",
            AuthError::Internal { .. } => "internal",
        }
    }
}

impl From<mailbox_state::StateError> for AuthError {
    fn from(e: mailbox_state::StateError) -> Self {
        AuthError::Internal {
            reason: e.to_string(),
        }
    }
}

/// Hashes a password with argon2id (RFC 9106's second recommended
/// setting as the argon2 crate defaults it: m = 19 MiB, t = 2, p = 1) into
/// its PHC string, with a random 16-byte salt.
pub fn hash_password(password: &str) -> Result<String, AuthError> {
    let salt_bytes: [u8; 16] = rand::random();
    let salt = SaltString::encode_b64(&salt_bytes).map_err(|e| AuthError::Internal {
        reason: format!("salt: {e}"),
    })?;
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| AuthError::Internal {
            reason: format!("hashing: {e}"),
        })
}

fn verify_password(password: &str, phc: &str) -> bool {
    match PasswordHash::new(phc) {
        Ok(h) => Argon2::default()
            .verify_password(password.as_bytes(), &h)
            .is_ok(),
        Err(_) => false,
    }
}

/// A new bearer token for `user`: the record to store and the text to
/// hand over once (`mbx_<id>_<secret>`; only the secret's SHA-256 is kept).
pub fn new_token(
    user: &User,
    label: &str,
    now_ms: i64,
    expires_ms: Option<i64>,
) -> (Token, String) {
    use base64::Engine as _;
    const ALNUM: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let id: String = (0..12)
        .map(|_| ALNUM[rand::random::<usize>() % ALNUM.len()] as char)
        .collect();
    let secret_bytes: [u8; 32] = rand::random();
    let secret = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret_bytes);
    let token = Token {
        id: id.clone(),
        user: user.name.clone(),
        incarnation: user.incarnation,
        secret_sha256: Digest::of(secret.as_bytes()),
        label: label.to_string(),
        created_ms: now_ms,
        expires_ms,
    };
    (token, format!("mbx_{id}_{secret}"))
}

/// A logged-in user: who, and their grants as of the login.
#[derive(Debug, Clone)]
pub struct Principal {
    /// The user.
    pub user: User,
    /// The user's grants.
    pub grants: Vec<Grant>,
}

impl Principal {
    /// The cluster mailbox a path the user names means (`None`: the root
    /// of the tree, which is no mailbox).
    pub fn resolve(&self, user_path: &str) -> Result<Option<MailboxPath>, AuthError> {
        resolve_path(self.user.root.as_ref(), user_path).map_err(|e| AuthError::BadPath {
            reason: e.to_string(),
        })
    }

    /// How the user sees a cluster mailbox path (`None`: outside the root).
    pub fn view(&self, mailbox: &MailboxPath) -> Option<String> {
        user_view(self.user.root.as_ref(), mailbox)
    }

    /// What the user may do on `mailbox`.
    pub fn perms(&self, mailbox: &MailboxPath) -> Perms {
        effective_perms(&self.user, &self.grants, mailbox)
    }

    /// Refuses `op` on `mailbox` unless granted; `shown` is the path as the
    /// user named it (for the error).
    pub fn check(&self, op: Perms, mailbox: &MailboxPath, shown: &str) -> Result<(), AuthError> {
        if self.perms(mailbox).allows(op) {
            Ok(())
        } else {
            Err(AuthError::Denied {
                op: op.to_string(),
                path: shown.to_string(),
            })
        }
    }

    /// Whether the user is an admin.
    pub fn is_admin(&self) -> bool {
        self.user.role == Role::Admin
    }
}

/// Settings of the login throttle.
#[derive(Debug, Clone, Copy)]
pub struct ThrottleConfig {
    /// The wait after the first failure (doubled by each further one).
    pub base: Duration,
    /// The longest wait.
    pub max: Duration,
    /// How long a failure counts.
    pub window: Duration,
    /// Users and addresses tracked at most (the oldest are forgotten).
    pub capacity: usize,
}

impl Default for ThrottleConfig {
    fn default() -> Self {
        ThrottleConfig {
            base: Duration::from_millis(250),
            max: Duration::from_secs(8),
            window: Duration::from_secs(15 * 60),
            capacity: 100_000,
        }
    }
}

/// Failed logins per user and per source address, in memory (a node's
/// own: each node slows what it sees).
#[derive(Debug)]
pub struct Throttle {
    cfg: ThrottleConfig,
    failures: Mutex<HashMap<String, (u32, Instant)>>,
}

impl Throttle {
    /// An empty throttle.
    pub fn new(cfg: ThrottleConfig) -> Self {
        Throttle {
            cfg,
            failures: Mutex::default(),
        }
    }

    fn keys(user: &str, from: IpAddr) -> [String; 2] {
        [format!("u:{user}"), format!("a:{from}")]
    }

    /// The wait owed before answering `user` from `from`: the larger of
    /// the user's and the address's.
    pub fn delay(&self, user: &str, from: IpAddr) -> Duration {
        let now = Instant::now();
        let f = self.failures.lock().expect("throttle lock");
        Self::keys(user, from)
            .iter()
            .filter_map(|k| f.get(k))
            .filter(|(_, at)| now.duration_since(*at) < self.cfg.window)
            .map(|(n, _)| self.wait(*n))
            .max()
            .unwrap_or_default()
    }

    fn wait(&self, failures: u32) -> Duration {
        if failures == 0 {
            return Duration::ZERO;
        }
        let shift = (failures - 1).min(16);
        (self.cfg.base * (1u32 << shift)).min(self.cfg.max)
    }

    /// Counts a failure of `user` from `from`.
    pub fn failed(&self, user: &str, from: IpAddr) {
        self.bump(user, from, true);
    }

    /// Adds one to both counts; `at_now`: dates them now (a failure), else
    /// only a new or expired entry is dated (a charge, which must not keep
    /// an old failure alive by itself).
    fn bump(&self, user: &str, from: IpAddr, at_now: bool) {
        let now = Instant::now();
        let mut f = self.failures.lock().expect("throttle lock");
        if f.len() + 2 > self.cfg.capacity {
            let window = self.cfg.window;
            f.retain(|_, (_, at)| now.duration_since(*at) < window);
            // Still full: forget the oldest entries.
            while f.len() + 2 > self.cfg.capacity {
                let Some(k) = f
                    .iter()
                    .min_by_key(|(_, (_, at))| *at)
                    .map(|(k, _)| k.clone())
                else {
                    break;
                };
                f.remove(&k);
            }
        }
        for k in Self::keys(user, from) {
            let e = f.entry(k).or_insert((0, now));
            if now.duration_since(e.1) >= self.cfg.window {
                *e = (0, now);
            }
            e.0 = e.0.saturating_add(1);
            if at_now {
                e.1 = now;
            }
        }
    }

    /// A charged attempt failed: both counts are dated now.
    pub fn confirm_failed(&self, user: &str, from: IpAddr) {
        let now = Instant::now();
        let mut f = self.failures.lock().expect("throttle lock");
        for k in Self::keys(user, from) {
            if let Some(e) = f.get_mut(&k) {
                e.1 = now;
            }
        }
    }

    /// Charges an attempt of `user` from `from` as a failure before it is
    /// checked, and returns the wait owed for the failures before it:
    /// parallel guesses each pay for the ones already in flight.
    pub fn charge(&self, user: &str, from: IpAddr) -> Duration {
        let wait = self.delay(user, from);
        self.bump(user, from, false);
        wait
    }

    /// A charged attempt of `user` from `from` succeeded: the user's count
    /// ends, and the address gets its charge back (the rest of its count
    /// stays: one right password does not clear a spray).
    pub fn succeeded(&self, user: &str, from: IpAddr) {
        let mut f = self.failures.lock().expect("throttle lock");
        f.remove(&format!("u:{user}"));
        let a = format!("a:{from}");
        if let Some(e) = f.get_mut(&a) {
            e.0 = e.0.saturating_sub(1);
            if e.0 == 0 {
                f.remove(&a);
            }
        }
    }
}

/// Compares two digests in time independent of where they differ.
fn same_digest(a: &Digest, b: &Digest) -> bool {
    a.0.iter()
        .zip(b.0.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

/// A user's account records as read for a login.
#[derive(Debug, Clone, Default)]
pub struct Account {
    user: Option<User>,
    grants: Vec<Grant>,
}

/// Reads `name`'s account for [`Authenticator::login`].
pub fn lookup(kv: &dyn KvRead, name: &str) -> Result<Account, AuthError> {
    let user = mailbox_state::accounts::get_user(kv, name)?;
    let grants = match &user {
        Some(u) => mailbox_state::accounts::user_grants(kv, &u.name)?,
        None => Vec::new(),
    };
    Ok(Account { user, grants })
}

/// A bearer token's records as read for [`Authenticator::token`].
#[derive(Debug, Clone, Default)]
pub struct TokenLookup {
    token: Option<Token>,
    user: Option<User>,
    grants: Vec<Grant>,
    secret: String,
}

/// Reads what the bearer token `bearer` (`mbx_<id>_<secret>`) names.
pub fn lookup_token(kv: &dyn KvRead, bearer: &str) -> Result<TokenLookup, AuthError> {
    let mut parts = bearer.splitn(3, '_');
    let (id, secret) = match (parts.next(), parts.next(), parts.next()) {
        (Some("mbx"), Some(id), Some(secret)) => (id, secret),
        _ => ("", ""),
    };
    let token = if id.is_empty() || id.len() > 32 || !id.chars().all(|c| c.is_ascii_alphanumeric())
    {
        None
    } else {
        mailbox_state::accounts::get_token(kv, id)?
    };
    let user = match &token {
        Some(t) => mailbox_state::accounts::get_user(kv, &t.user)?,
        None => None,
    };
    let grants = match &user {
        Some(u) => mailbox_state::accounts::user_grants(kv, &u.name)?,
        None => Vec::new(),
    };
    Ok(TokenLookup {
        token,
        user,
        grants,
        secret: secret.to_string(),
    })
}

/// What a login presents.
pub enum Credential<'a> {
    /// A password.
    Password(&'a str),
    /// An SSH public key's blob (the key, as the SSH wire carries it; the
    /// SSH layer has checked the signature).
    PublicKey(&'a [u8]),
}

/// Checks logins against the account records, throttled.
#[derive(Debug)]
pub struct Authenticator {
    throttle: Throttle,
    /// Checked for unknown users, so they cost what a known one does.
    dummy_hash: String,
    /// Password checks running at once at most (each takes 19 MiB and
    /// tens of milliseconds of a core): a flood of logins queues here
    /// instead of taking the node's memory and CPU.
    checks: tokio::sync::Semaphore,
}

/// Password checks at once at most, per node.
pub const MAX_CONCURRENT_CHECKS: usize = 4;

impl Authenticator {
    /// An authenticator with the given throttle settings.
    pub fn new(cfg: ThrottleConfig) -> Result<Self, AuthError> {
        Ok(Authenticator {
            throttle: Throttle::new(cfg),
            dummy_hash: hash_password("no such user")?,
            checks: tokio::sync::Semaphore::new(MAX_CONCURRENT_CHECKS),
        })
    }

    /// The throttle (for tests and metrics).
    pub fn throttle(&self) -> &Throttle {
        &self.throttle
    }

    /// Logs `name` in with `cred`, from `from`; `door` names the protocol
    /// in the log. `account` is [`lookup`]'s (read first, so that the state
    /// view is not held across the check's awaits).
    pub async fn login(
        &self,
        account: Account,
        name: &str,
        cred: Credential<'_>,
        from: IpAddr,
        door: &str,
    ) -> Result<Principal, AuthError> {
        let Account { user, grants } = account;
        // Names that cannot be users share one throttle key (a huge or
        // random name must not become an entry of its own).
        let name = if validate_user_name(name).is_ok() {
            name
        } else {
            "(not a user name)"
        };
        // The attempt counts as a failure until it succeeds, and the wait
        // owed for earlier ones comes first, before any work: guessing in
        // parallel or guessing right teaches nothing sooner.
        let wait = self.throttle.charge(name, from);
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        let outcome: Result<(), &'static str> = match cred {
            Credential::Password(pw) => {
                let hash = user
                    .as_ref()
                    .and_then(|u| u.password_hash.clone())
                    .unwrap_or_else(|| self.dummy_hash.clone());
                let pw = pw.to_string();
                let _permit = self
                    .checks
                    .acquire()
                    .await
                    .map_err(|e| AuthError::Internal {
                        reason: format!("password check: {e}"),
                    })?;
                let ok = tokio::task::spawn_blocking(move || verify_password(&pw, &hash))
                    .await
                    .map_err(|e| AuthError::Internal {
                        reason: format!("password check: {e}"),
                    })?;
                match (&user, ok) {
                    (None, _) => Err("unknown user"),
                    (Some(u), _) if u.password_hash.is_none() => Err("no password set"),
                    (Some(_), false) => Err("wrong password"),
                    (Some(_), true) => Ok(()),
                }
            }
            Credential::PublicKey(blob) => match &user {
                None => Err("unknown user"),
                Some(u) if u.ssh_keys.iter().any(|k| k.blob == blob) => Ok(()),
                Some(_) => Err("unknown key"),
            },
        };
        let disabled = user.as_ref().is_some_and(|u| u.disabled);
        let outcome = outcome.and(if disabled {
            Err("user disabled")
        } else {
            Ok(())
        });
        match outcome {
            Ok(()) => {
                self.throttle.succeeded(name, from);
                tracing::info!(user = name, %from, door, "login");
                Ok(Principal {
                    user: user.expect("checked"),
                    grants,
                })
            }
            Err(reason) => {
                self.throttle.confirm_failed(name, from);
                tracing::warn!(user = name, %from, door, reason, "login failed");
                Err(AuthError::Failed)
            }
        }
    }

    /// Logs in with the bearer token [`lookup_token`] read, at `now_ms`.
    pub async fn token(
        &self,
        found: TokenLookup,
        from: IpAddr,
        now_ms: i64,
    ) -> Result<Principal, AuthError> {
        let TokenLookup {
            token,
            user,
            grants,
            secret,
        } = found;
        let name = token.as_ref().map_or("?", |t| t.user.as_str()).to_string();
        // Throttled per token id (public: a wrong secret for it must not
        // slow its user's other logins) and per address, charged first.
        let key = format!("token {}", token.as_ref().map_or("?", |t| t.id.as_str()));
        let wait = self.throttle.charge(&key, from);
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        let digest = Digest::of(secret.as_bytes());
        let outcome = match (&token, &user) {
            (None, _) => Err("unknown token"),
            (Some(t), _) if !same_digest(&t.secret_sha256, &digest) => Err("wrong token secret"),
            (Some(t), _) if t.expires_ms.is_some_and(|e| e <= now_ms) => Err("token expired"),
            (Some(_), None) => Err("the token's user no longer exists"),
            (Some(t), Some(u)) if t.incarnation != u.incarnation => {
                Err("the token belongs to an earlier user of that name")
            }
            (Some(_), Some(u)) if u.disabled => Err("user disabled"),
            (Some(_), Some(_)) => Ok(()),
        };
        match outcome {
            Ok(()) => {
                let user = user.expect("checked");
                self.throttle.succeeded(&key, from);
                Ok(Principal { user, grants })
            }
            Err(reason) => {
                self.throttle.confirm_failed(&key, from);
                tracing::warn!(user = %name, %from, door = "http", reason, "token login failed");
                Err(AuthError::Failed)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use mailbox_state::{apply, ApplyCtx, Command, MemKv, Overlay};
    use mailbox_types::account::{AccountValue, SshKey};

    use super::*;

    const KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl demo@host";

    fn run(kv: &mut MemKv, cmd: Command) {
        let mut ov = Overlay::new();
        apply(kv, &mut ov, &ApplyCtx::new("east"), &cmd).unwrap();
        kv.commit(ov);
    }

    fn set(kv: &mut MemKv, v: AccountValue) {
        run(
            kv,
            Command::SetAccount {
                key: v.key(),
                value: Some(v),
                wall_ms: 1_000,
            },
        );
    }

    fn setup() -> MemKv {
        let mut kv = MemKv::default();
        run(
            &mut kv,
            Command::SetClusterDcs {
                dcs: vec!["east".into()],
            },
        );
        set(
            &mut kv,
            AccountValue::User(User {
                name: "demo".into(),
                role: Role::Partner,
                password_hash: Some(hash_password("demo").unwrap()),
                ssh_keys: vec![SshKey::parse(KEY).unwrap()],
                root: Some(MailboxPath::parse("/partners/demo").unwrap()),
                disabled: false,
                incarnation: 0,
                created: Default::default(),
            }),
        );
        set(
            &mut kv,
            AccountValue::Grant(Grant {
                user: "demo".into(),
                incarnation: 0,
                mailbox: MailboxPath::parse("/partners/demo/inbox").unwrap(),
                perms: Perms::parse("list,upload").unwrap(),
                subtree: true,
            }),
        );
        kv
    }

    fn fast() -> ThrottleConfig {
        ThrottleConfig {
            base: Duration::from_millis(40),
            max: Duration::from_millis(160),
            ..Default::default()
        }
    }

    const A: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));
    const B: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 2));

    #[tokio::test]
    async fn passwords_keys_and_grants() {
        let kv = setup();
        let auth = Authenticator::new(fast()).unwrap();
        let login = |name: &str, pw: &str| {
            let acct = lookup(&kv, name).unwrap();
            let (name, pw) = (name.to_string(), pw.to_string());
            let auth = &auth;
            async move {
                auth.login(acct, &name, Credential::Password(&pw), A, "test")
                    .await
            }
        };
        let p = login("demo", "demo").await.unwrap();
        let inbox = p.resolve("/inbox/2026").unwrap().unwrap();
        assert_eq!(inbox.as_str(), "/partners/demo/inbox/2026");
        p.check(Perms::UPLOAD, &inbox, "/inbox/2026").unwrap();
        assert!(matches!(
            p.check(Perms::DELETE, &inbox, "/inbox/2026"),
            Err(AuthError::Denied { .. })
        ));
        assert!(p.resolve("/../other").is_err());
        // Unknown user and wrong password: the same error.
        let e1 = login("nobody", "demo").await.unwrap_err();
        let e2 = login("demo", "wrong").await.unwrap_err();
        assert_eq!(e1.to_string(), e2.to_string());
        assert_eq!(e1.code(), "unauthenticated");
        // SSH keys by blob.
        let blob = SshKey::parse(KEY).unwrap().blob;
        let acct = lookup(&kv, "demo").unwrap();
        auth.login(acct, "demo", Credential::PublicKey(&blob), B, "test")
            .await
            .unwrap();
        let acct = lookup(&kv, "demo").unwrap();
        assert!(auth
            .login(acct, "demo", Credential::PublicKey(b"other"), B, "test")
            .await
            .is_err());
    }

    #[tokio::test]
    async fn failures_slow_that_user_and_that_address_only() {
        let kv = setup();
        let auth = Authenticator::new(fast()).unwrap();
        for _ in 0..4 {
            let acct = lookup(&kv, "demo").unwrap();
            let _ = auth
                .login(acct, "demo", Credential::Password("x"), A, "test")
                .await;
        }
        // 4 failures: 40 ms doubled thrice, capped at 160 ms.
        assert_eq!(auth.throttle().delay("demo", B), Duration::from_millis(160));
        assert_eq!(
            auth.throttle().delay("other", A),
            Duration::from_millis(160)
        );
        assert_eq!(auth.throttle().delay("other", B), Duration::ZERO);
        // The right password still works (after the wait owed), and ends
        // the user's count; the address's stays.
        let t = Instant::now();
        let acct = lookup(&kv, "demo").unwrap();
        auth.login(acct, "demo", Credential::Password("demo"), B, "test")
            .await
            .unwrap();
        assert!(t.elapsed() >= Duration::from_millis(160));
        assert_eq!(auth.throttle().delay("demo", B), Duration::ZERO);
        assert_eq!(
            auth.throttle().delay("other", A),
            Duration::from_millis(160)
        );
    }

    #[test]
    fn a_polling_client_does_not_keep_an_old_failure_alive() {
        let t = Throttle::new(ThrottleConfig {
            base: Duration::from_millis(40),
            max: Duration::from_millis(160),
            window: Duration::from_millis(300),
            capacity: 100,
        });
        t.failed("demo", A);
        assert_eq!(t.delay("other", A), Duration::from_millis(40));
        // Another user logs in from the same address, often: each attempt
        // is charged, then refunded.
        let start = Instant::now();
        while start.elapsed() < Duration::from_millis(450) {
            t.charge("other", A);
            t.succeeded("other", A);
            std::thread::sleep(Duration::from_millis(30));
        }
        // The one failure has expired.
        assert_eq!(t.delay("other", A), Duration::ZERO);
    }

    #[tokio::test]
    async fn tokens_are_checked_by_secret_expiry_and_incarnation() {
        let mut kv = setup();
        let auth = Authenticator::new(fast()).unwrap();
        let user = mailbox_state::accounts::get_user(&kv, "demo")
            .unwrap()
            .unwrap();
        let (token, text) = new_token(&user, "ci", 1_000, Some(5_000));
        set(&mut kv, AccountValue::Token(token));
        let p = auth
            .token(lookup_token(&kv, &text).unwrap(), A, 2_000)
            .await
            .unwrap();
        assert_eq!(p.user.name, "demo");
        // Expired; a wrong secret; garbage.
        assert!(auth
            .token(lookup_token(&kv, &text).unwrap(), A, 5_000)
            .await
            .is_err());
        let wrong = format!("{}x", &text[..text.len() - 1]);
        assert!(auth
            .token(lookup_token(&kv, &wrong).unwrap(), A, 2_000)
            .await
            .is_err());
        assert!(auth
            .token(lookup_token(&kv, "mbx_").unwrap(), A, 2_000)
            .await
            .is_err());
        assert!(auth
            .token(lookup_token(&kv, "bearer").unwrap(), A, 2_000)
            .await
            .is_err());
        // The user deleted and made again: the old token is worth nothing.
        run(
            &mut kv,
            Command::SetAccount {
                key: mailbox_types::account::AccountKey::User("demo".into()),
                value: None,
                wall_ms: 3_000,
            },
        );
        let mut again = user;
        again.incarnation = 0; // a creation
        set(&mut kv, AccountValue::User(again));
        assert!(auth
            .token(lookup_token(&kv, &text).unwrap(), B, 2_000)
            .await
            .is_err());
    }
}
