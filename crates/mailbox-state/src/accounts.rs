//! Accounts (users, grants, tokens) as replicated cluster configuration.
//!
//! Each record is a last-writer-wins register (`D` keys), like the event
//! rules: a local change is stamped above every stamp this DC has seen and
//! sent through the feed; a change from another DC's feed is kept if its
//! stamp is newer. A delete keeps the register (value `None`) so that an
//! older write arriving late cannot bring the record back, and resyncs
//! carry deletes too. So a user added in one DC logs in everywhere, and a
//! user removed in one DC is removed everywhere.
//!
//! Invariants:
//! - a grant or token is stored only for a live user, and names that
//!   user's incarnation (fixed when the user is created, kept by updates):
//!   a later user of the same name does not inherit them;
//! - a user's update names the incarnation it was made from (`User::
//!   incarnation`, 0 for a creation): it is refused where that user is
//!   gone or another one, and a creation is refused where one is live, so
//!   no update re-creates a deleted user;
//! - a user's delete records the incarnation it deleted (`gone`) and wins
//!   over every copy of that incarnation, whatever their stamps: an update
//!   made in another DC before it heard of the delete does not bring the
//!   user (and its grants and tokens) back;
//! - applying a change twice (a retried proposal) is the same success.
//!
//! Concurrent updates of one live user in two DCs: the later stamp wins
//! for the whole record (a `passwd` in one DC can undo a concurrent
//! `disable` in the other; disable again once both are seen).

use mailbox_types::account::{AccountKey, AccountValue, Grant, Token, User};
use mailbox_types::Stamp;
use serde::{Deserialize, Serialize};

use crate::replication::{feed_append, max_hlc, FeedRecord};
use crate::{
    decode, encode, keys, ApplyCtx, CommandResponse, CommandResult, KvRead, Overlay, StateError,
};

/// One account register.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountRecord {
    /// Its name.
    pub key: AccountKey,
    /// Its value; `None`: deleted.
    pub value: Option<AccountValue>,
    /// The last change's stamp.
    pub stamp: Stamp,
    /// For a deleted user: the incarnation deleted and its creation.
    pub gone: Option<(u64, Stamp)>,
}

impl AccountRecord {
    /// Where a user register's version stands (see [`set_account_remote`]):
    /// the incarnation's creation, then deleted over live, then the stamp.
    fn user_rank(&self) -> (Option<&Stamp>, bool, &Stamp) {
        match (&self.value, &self.gone) {
            (Some(AccountValue::User(u)), _) => (Some(&u.created), false, &self.stamp),
            (None, Some((_, created))) => (Some(created), true, &self.stamp),
            _ => (None, self.value.is_none(), &self.stamp),
        }
    }
}

fn load(
    base: &dyn KvRead,
    ov: &Overlay,
    key: &AccountKey,
) -> Result<Option<AccountRecord>, StateError> {
    ov.load(base, &keys::account(key))
}

fn live_user(base: &dyn KvRead, ov: &Overlay, name: &str) -> Result<Option<User>, StateError> {
    Ok(
        match load(base, ov, &AccountKey::User(name.to_string()))?.and_then(|r| r.value) {
            Some(AccountValue::User(u)) => Some(u),
            _ => None,
        },
    )
}

fn not_found(key: &AccountKey) -> StateError {
    StateError::AccountNotFound {
        what: match key {
            AccountKey::User(u) => format!("user {u}"),
            AccountKey::Grant(u, m) => format!("grant of {m} to {u}"),
            AccountKey::Token(t) => format!("token {t}"),
        },
    }
}

/// A local account change (`value: None` deletes `key`).
pub(crate) fn set_account_local(
    base: &dyn KvRead,
    ov: &mut Overlay,
    ctx: &ApplyCtx,
    key: &AccountKey,
    value: Option<&AccountValue>,
    wall_ms: i64,
) -> CommandResponse {
    let prev = load(base, ov, key)?;
    let mut hlc = max_hlc(base, ov)?;
    if let Some(p) = &prev {
        hlc = hlc.max(p.stamp.hlc);
    }
    let hlc = hlc.tick(wall_ms);
    let mut gone = None;
    let value = match value {
        None => match &prev {
            None => return Err(not_found(key)),
            // Deleted already (a retried proposal): the same success.
            Some(p) if p.value.is_none() => return Ok(CommandResult::None),
            Some(p) => {
                if let Some(AccountValue::User(u)) = &p.value {
                    gone = Some((u.incarnation, u.created.clone()));
                }
                None
            }
        },
        Some(v) => {
            v.validate().map_err(|e| StateError::Invalid {
                reason: e.to_string(),
            })?;
            if v.key() != *key {
                return Err(StateError::Invalid {
                    reason: format!("account record {:?} stored under {key:?}", v.key()),
                });
            }
            let mut v = v.clone();
            match &mut v {
                AccountValue::User(u) => {
                    // An update names the incarnation it was made from;
                    // a creation (0) starts a new one.
                    match (live_user(base, ov, &u.name)?, u.incarnation) {
                        (None, 0) => {
                            u.created = Stamp::new(hlc, ctx.local_dc.clone());
                            u.incarnation = incarnation(&u.created);
                        }
                        (Some(_), 0) => {
                            return Err(StateError::Invalid {
                                reason: format!("user {} already exists", u.name),
                            })
                        }
                        (Some(old), i) if old.incarnation == i => u.created = old.created,
                        (_, _) => {
                            return Err(StateError::AccountNotFound {
                                what: format!(
                                    "user {} as it was when this change was made (deleted or made again since)",
                                    u.name
                                ),
                            })
                        }
                    }
                }
                AccountValue::Grant(Grant {
                    user, incarnation, ..
                })
                | AccountValue::Token(Token {
                    user, incarnation, ..
                }) => {
                    let Some(u) = live_user(base, ov, user)? else {
                        return Err(not_found(&AccountKey::User(user.clone())));
                    };
                    *incarnation = u.incarnation;
                }
            }
            Some(v)
        }
    };
    ov.put(keys::MAX_HLC.to_vec(), encode(&hlc));
    let rec = AccountRecord {
        key: key.clone(),
        value,
        stamp: Stamp::new(hlc, ctx.local_dc.clone()),
        gone,
    };
    ov.put(keys::account(key), encode(&rec));
    feed_append(
        base,
        ov,
        &FeedRecord::Account {
            record: Box::new(rec),
        },
    )?;
    Ok(CommandResult::None)
}

/// A user incarnation from the creation's stamp (clock and DC): two DCs
/// creating one name at the same moment get different ones. Never 0.
fn incarnation(created: &Stamp) -> u64 {
    use sha2::Digest as _;
    let mut h = sha2::Sha256::new();
    h.update(created.hlc.wall_ms.to_be_bytes());
    h.update(created.hlc.logical.to_be_bytes());
    h.update(created.dc.as_bytes());
    let d = h.finalize();
    u64::from_be_bytes(d[..8].try_into().expect("8 bytes")).max(1)
}

/// An account change from another DC's feed (or a resync): kept if newer.
pub(crate) fn set_account_remote(
    base: &dyn KvRead,
    ov: &mut Overlay,
    rec: &AccountRecord,
) -> Result<(), StateError> {
    if rec.stamp.hlc > max_hlc(base, ov)? {
        ov.put(keys::MAX_HLC.to_vec(), encode(&rec.stamp.hlc));
    }
    let prev = load(base, ov, &rec.key)?;
    if let Some(p) = &prev {
        let newer = match rec.key {
            // Users: the later created incarnation wins (the other was
            // deleted, or lost a concurrent creation); within one, a
            // delete wins over every copy, newer stamps included (an
            // update made before the delete was heard of); then the
            // stamp. A total order, so every DC keeps the same record.
            AccountKey::User(_) => rec.user_rank() > p.user_rank(),
            _ => rec.stamp > p.stamp,
        };
        if !newer {
            return Ok(());
        }
    }
    ov.put(keys::account(&rec.key), encode(rec));
    Ok(())
}

/// Every account register (deleted ones included), for a resync page.
pub(crate) fn decode_record(k: &[u8], v: &[u8]) -> Result<AccountRecord, StateError> {
    decode(k, v)
}

/// A live user.
pub fn get_user(kv: &dyn KvRead, name: &str) -> Result<Option<User>, StateError> {
    live_user(kv, &Overlay::default(), name)
}

/// The live users, by name.
pub fn list_users(kv: &dyn KvRead) -> Result<Vec<User>, StateError> {
    Ok(records(kv, &keys::account_kind_prefix(b'u'))?
        .into_iter()
        .filter_map(|v| match v {
            AccountValue::User(u) => Some(u),
            _ => None,
        })
        .collect())
}

/// The live grants of `user` (of every incarnation: callers compare).
pub fn user_grants(kv: &dyn KvRead, user: &str) -> Result<Vec<Grant>, StateError> {
    Ok(records(kv, &keys::account_grants_prefix(user))?
        .into_iter()
        .filter_map(|v| match v {
            AccountValue::Grant(g) => Some(g),
            _ => None,
        })
        .collect())
}

/// A live token by id.
pub fn get_token(kv: &dyn KvRead, id: &str) -> Result<Option<Token>, StateError> {
    let k = keys::account(&AccountKey::Token(id.to_string()));
    Ok(match kv.get(&k)? {
        Some(v) => match decode::<AccountRecord>(&k, &v)?.value {
            Some(AccountValue::Token(t)) => Some(t),
            _ => None,
        },
        None => None,
    })
}

/// The live tokens (of every user), by id.
pub fn list_tokens(kv: &dyn KvRead) -> Result<Vec<Token>, StateError> {
    Ok(records(kv, &keys::account_kind_prefix(b't'))?
        .into_iter()
        .filter_map(|v| match v {
            AccountValue::Token(t) => Some(t),
            _ => None,
        })
        .collect())
}

fn records(kv: &dyn KvRead, prefix: &[u8]) -> Result<Vec<AccountValue>, StateError> {
    let mut out = Vec::new();
    let mut after: Option<Vec<u8>> = None;
    loop {
        let rows = kv.scan(prefix, after.as_deref(), 256)?;
        let full = rows.len() == 256;
        for (k, v) in rows {
            if let Some(val) = decode::<AccountRecord>(&k, &v)?.value {
                out.push(val);
            }
            after = Some(k);
        }
        if !full {
            return Ok(out);
        }
    }
}

#[cfg(test)]
mod tests {
    use mailbox_types::account::{effective_perms, Perms, Role};
    use mailbox_types::MailboxPath;

    use super::*;
    use crate::replication::{feed_head, feed_since, resync_page};
    use crate::{apply, Command, MemKv};

    struct Dc {
        kv: MemKv,
        ctx: ApplyCtx,
    }

    impl Dc {
        fn new(name: &str) -> Dc {
            let mut dc = Dc {
                kv: MemKv::default(),
                ctx: ApplyCtx::new(name),
            };
            dc.run(Command::SetClusterDcs {
                dcs: vec!["east".into(), "west".into()],
            })
            .unwrap();
            dc
        }

        fn run(&mut self, cmd: Command) -> CommandResponse {
            let mut ov = Overlay::new();
            let r = apply(&self.kv, &mut ov, &self.ctx, &cmd);
            if r.is_err() {
                assert!(ov.is_empty(), "refused command wrote {} keys", ov.len());
            }
            self.kv.commit(ov);
            r
        }

        fn set(&mut self, value: AccountValue, wall_ms: i64) -> CommandResponse {
            self.run(Command::SetAccount {
                key: value.key(),
                value: Some(value),
                wall_ms,
            })
        }

        fn delete(&mut self, key: AccountKey, wall_ms: i64) -> CommandResponse {
            self.run(Command::SetAccount {
                key,
                value: None,
                wall_ms,
            })
        }

        fn pull(&mut self, from: &Dc) {
            let since = crate::replication::cursor(&self.kv, &from.ctx.local_dc).unwrap();
            self.run(Command::ApplyRemote {
                origin: from.ctx.local_dc.clone(),
                records: feed_since(&from.kv, since, 1000).unwrap(),
                received_ms: 1_000,
                payload_here: vec![],
                identity: String::new(),
                head: feed_head(&from.kv).unwrap(),
            })
            .unwrap();
        }
    }

    fn mb(s: &str) -> MailboxPath {
        MailboxPath::parse(s).unwrap()
    }

    fn user(name: &str) -> AccountValue {
        AccountValue::User(User {
            name: name.into(),
            role: Role::Partner,
            password_hash: Some("$argon2id$v=19$m=19456,t=2,p=1$c2FsdA$aGFzaA".into()),
            ssh_keys: vec![],
            root: Some(mb("/partners/acme")),
            disabled: false,
            incarnation: 0,
            created: Stamp::default(),
        })
    }

    /// `user(name)` as an update of the incarnation live in `dc`.
    fn update_of(dc: &Dc, name: &str) -> AccountValue {
        let mut v = user(name);
        if let AccountValue::User(u) = &mut v {
            u.incarnation = get_user(&dc.kv, name).unwrap().unwrap().incarnation;
        }
        v
    }

    fn grant(name: &str, path: &str) -> AccountValue {
        AccountValue::Grant(Grant {
            user: name.into(),
            incarnation: 0,
            mailbox: mb(path),
            perms: Perms::parse("list,upload").unwrap(),
            subtree: true,
        })
    }

    fn perms(dc: &Dc, name: &str, path: &str) -> Perms {
        let u = get_user(&dc.kv, name).unwrap().expect("user");
        effective_perms(&u, &user_grants(&dc.kv, name).unwrap(), &mb(path))
    }

    #[test]
    fn a_user_added_in_one_dc_works_in_the_other_and_a_delete_wins_there_too() {
        let mut east = Dc::new("east");
        let mut west = Dc::new("west");
        east.set(user("acme"), 100).unwrap();
        east.set(grant("acme", "/partners/acme/inbox"), 101)
            .unwrap();
        west.pull(&east);
        let u = get_user(&west.kv, "acme").unwrap().expect("replicated");
        assert_eq!(u, get_user(&east.kv, "acme").unwrap().unwrap());
        assert!(perms(&west, "acme", "/partners/acme/inbox/x").allows(Perms::UPLOAD));
        // Deleted in west; east hears of it.
        west.delete(AccountKey::User("acme".into()), 200).unwrap();
        // A retried delete is the same success; an unknown one is an error.
        west.delete(AccountKey::User("acme".into()), 200).unwrap();
        assert!(matches!(
            west.delete(AccountKey::User("nobody".into()), 201),
            Err(StateError::AccountNotFound { .. })
        ));
        east.pull(&west);
        assert_eq!(get_user(&east.kv, "acme").unwrap(), None);
        // East's own older write, applied again at west (a late copy),
        // does not bring the user back.
        let mut ov = Overlay::new();
        let old = feed_since(&east.kv, 0, 10).unwrap();
        for (_, rec) in &old {
            if let FeedRecord::Account { record } = rec {
                set_account_remote(&west.kv, &mut ov, record).unwrap();
            }
        }
        west.kv.commit(ov);
        assert_eq!(get_user(&west.kv, "acme").unwrap(), None);
        // A DC rebuilt from empty gets the registers, deletes included, by
        // resync.
        let (page, next) = resync_page(&east.kv, "east", "north", None, 10_000, 1 << 20).unwrap();
        assert!(next.is_none());
        let accounts: Vec<_> = page
            .iter()
            .filter_map(|r| match r {
                FeedRecord::Account { record } => Some(record.key.clone()),
                _ => None,
            })
            .collect();
        assert_eq!(
            accounts,
            vec![
                AccountKey::Grant("acme".into(), mb("/partners/acme/inbox")),
                AccountKey::User("acme".into()),
            ]
        );
    }

    #[test]
    fn a_user_created_again_does_not_inherit_the_old_grants() {
        let mut east = Dc::new("east");
        east.set(user("acme"), 100).unwrap();
        east.set(grant("acme", "/partners/acme"), 101).unwrap();
        assert!(perms(&east, "acme", "/partners/acme/inbox").allows(Perms::LIST));
        // An update (new password) keeps the grants; a creation of a live
        // user is refused.
        east.set(update_of(&east, "acme"), 150).unwrap();
        assert!(matches!(
            east.set(user("acme"), 160),
            Err(StateError::Invalid { .. })
        ));
        assert!(perms(&east, "acme", "/partners/acme/inbox").allows(Perms::LIST));
        east.delete(AccountKey::User("acme".into()), 200).unwrap();
        east.set(user("acme"), 300).unwrap();
        assert_eq!(perms(&east, "acme", "/partners/acme/inbox"), Perms::NONE);
        // No grant or token for a user that does not exist; bad records
        // are refused (and `Dc::run` checks they wrote nothing).
        assert!(matches!(
            east.set(grant("nobody", "/x"), 400),
            Err(StateError::AccountNotFound { .. })
        ));
        let mut bad = user("Bad Name");
        assert!(matches!(
            east.set(bad.clone(), 400),
            Err(StateError::Invalid { .. })
        ));
        if let AccountValue::User(u) = &mut bad {
            u.name = "ok".into();
            u.password_hash = Some("plaintext".into());
        }
        assert!(matches!(
            east.set(bad, 400),
            Err(StateError::Invalid { .. })
        ));
        // A value under another record's key.
        assert!(matches!(
            east.run(Command::SetAccount {
                key: AccountKey::User("other".into()),
                value: Some(user("acme")),
                wall_ms: 400,
            }),
            Err(StateError::Invalid { .. })
        ));
    }

    #[test]
    fn concurrent_changes_in_two_dcs_converge() {
        let mut east = Dc::new("east");
        let mut west = Dc::new("west");
        east.set(user("acme"), 100).unwrap();
        west.pull(&east);
        // Both change the user at once, unaware of each other.
        let mut a = update_of(&east, "acme");
        let mut b = update_of(&west, "acme");
        if let (AccountValue::User(a), AccountValue::User(b)) = (&mut a, &mut b) {
            a.disabled = true;
            b.ssh_keys = vec![];
            b.root = Some(mb("/partners/acme2"));
        }
        east.set(a, 500).unwrap();
        west.set(b, 500).unwrap();
        east.pull(&west);
        west.pull(&east);
        assert_eq!(
            get_user(&east.kv, "acme").unwrap(),
            get_user(&west.kv, "acme").unwrap()
        );
        assert_eq!(list_users(&east.kv).unwrap().len(), 1);
    }

    #[test]
    fn an_update_made_before_a_delete_was_heard_of_does_not_bring_the_user_back() {
        let mut east = Dc::new("east");
        let mut west = Dc::new("west");
        east.set(user("acme"), 100).unwrap();
        east.set(grant("acme", "/partners/acme"), 101).unwrap();
        west.pull(&east);
        // West deletes acme; east, not knowing, changes its password later.
        west.delete(AccountKey::User("acme".into()), 200).unwrap();
        east.set(update_of(&east, "acme"), 300).unwrap();
        east.pull(&west);
        west.pull(&east);
        assert_eq!(get_user(&east.kv, "acme").unwrap(), None, "east");
        assert_eq!(get_user(&west.kv, "acme").unwrap(), None, "west");
        // An update of the deleted incarnation is refused where it is
        // known to be gone.
        let stale = update_of_incarnation("acme", 1);
        assert!(matches!(
            east.set(stale, 400),
            Err(StateError::AccountNotFound { .. })
        ));
        // Made again in west, after the delete; an old update of the first
        // incarnation arriving later does not replace the new user.
        west.set(user("acme"), 500).unwrap();
        let fresh = get_user(&west.kv, "acme").unwrap().unwrap();
        west.pull(&east);
        assert_eq!(get_user(&west.kv, "acme").unwrap(), Some(fresh.clone()));
        east.pull(&west);
        assert_eq!(get_user(&east.kv, "acme").unwrap(), Some(fresh));
        // The old grant does not apply to the new user.
        assert_eq!(perms(&east, "acme", "/partners/acme/x"), Perms::NONE);
    }

    fn update_of_incarnation(name: &str, incarnation: u64) -> AccountValue {
        let mut v = user(name);
        if let AccountValue::User(u) = &mut v {
            u.incarnation = incarnation;
        }
        v
    }
}
