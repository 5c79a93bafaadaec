//! `mailbox user …`: users, SSH keys, tokens and grants (replicated to
//! every DC). Passwords are read from a file or standard input, never from
//! the command line (it ends up in shell histories and `ps`).

use std::io::Read as _;

use anyhow::Context;
use clap::Subcommand;
use mailbox_client::{Client, ClientError};
use mailbox_proto::v1 as pb;
use mailbox_types::HumanDuration;
use serde_json::json;

/// `mailbox user` subcommands.
#[derive(Subcommand)]
pub enum UserCmd {
    /// Create a user.
    Add {
        /// Login name (a-z 0-9 . _ -).
        name: String,
        /// partner (default) or admin.
        #[arg(long, default_value = "partner")]
        role: String,
        /// The mailbox the user sees as `/` (default: the whole tree).
        #[arg(long)]
        root: Option<String>,
        /// Read the password from this file (first line).
        #[arg(long, conflicts_with = "password_stdin")]
        password_file: Option<std::path::PathBuf>,
        /// Read the password from standard input (first line).
        #[arg(long)]
        password_stdin: bool,
        /// Accept this SSH public key (a .pub file).
        #[arg(long)]
        key_file: Option<std::path::PathBuf>,
    },
    /// Set a user's password.
    Passwd {
        /// The user.
        name: String,
        /// Read the password from this file (first line).
        #[arg(long, conflicts_with = "password_stdin")]
        password_file: Option<std::path::PathBuf>,
        /// Read the password from standard input (first line).
        #[arg(long)]
        password_stdin: bool,
    },
    /// Refuse every login of a user (`--enable` lets them in again).
    Disable {
        /// The user.
        name: String,
        /// Enable instead.
        #[arg(long)]
        enable: bool,
    },
    /// Delete a user (its grants and tokens stop working).
    Rm {
        /// The user.
        name: String,
    },
    /// SSH public keys.
    Key {
        #[command(subcommand)]
        cmd: KeyCmd,
    },
    /// Bearer tokens for the HTTP API.
    Token {
        #[command(subcommand)]
        cmd: TokenCmd,
    },
    /// Grant operations on a mailbox (and, by default, its sub-mailboxes).
    Grant {
        /// The user.
        name: String,
        /// The mailbox (a cluster path).
        mailbox: String,
        /// list, upload, download, delete, create, admin (comma-separated), or all.
        perms: String,
        /// Only this mailbox, not its sub-mailboxes.
        #[arg(long)]
        no_subtree: bool,
    },
    /// Remove a user's grant on a mailbox.
    Revoke {
        /// The user.
        name: String,
        /// The mailbox.
        mailbox: String,
    },
    /// Users with their keys, grants and tokens.
    Ls,
}

/// `mailbox user key` subcommands.
#[derive(Subcommand)]
pub enum KeyCmd {
    /// Accept a public key (a .pub file) for the user.
    Add {
        /// The user.
        name: String,
        /// The .pub file.
        file: std::path::PathBuf,
    },
    /// Stop accepting a key, by its SHA256 fingerprint (as `user ls` shows).
    Rm {
        /// The user.
        name: String,
        /// `SHA256:…`.
        fingerprint: String,
    },
}

/// `mailbox user token` subcommands.
#[derive(Subcommand)]
pub enum TokenCmd {
    /// Make a token; its text is printed once.
    Add {
        /// The user.
        name: String,
        /// What it is for.
        #[arg(long, default_value = "")]
        label: String,
        /// Lifetime (e.g. 90d); default: no expiry.
        #[arg(long)]
        ttl: Option<HumanDuration>,
    },
    /// Revoke a token by id.
    Revoke {
        /// The token id (the part after `mbx_`).
        id: String,
    },
}

fn st(s: tonic::Status) -> anyhow::Error {
    ClientError::from(s).into()
}

fn read_password(file: &Option<std::path::PathBuf>, stdin: bool) -> anyhow::Result<String> {
    let text = match (file, stdin) {
        (Some(f), _) => {
            std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?
        }
        (None, true) => {
            let mut s = String::new();
            std::io::stdin()
                .read_to_string(&mut s)
                .context("reading the password from standard input")?;
            s
        }
        (None, false) => return Ok(String::new()),
    };
    let pw = text.lines().next().unwrap_or("").to_string();
    anyhow::ensure!(!pw.is_empty(), "the password is empty");
    Ok(pw)
}

fn user_json(u: &pb::UserInfo) -> serde_json::Value {
    json!({
        "name": u.name, "role": u.role, "root": if u.root.is_empty() { "/" } else { &u.root },
        "has_password": u.has_password, "disabled": u.disabled,
        "keys": u.keys.iter().map(|k| json!({"algorithm": k.algorithm, "fingerprint": k.fingerprint, "comment": k.comment})).collect::<Vec<_>>(),
        "grants": u.grants.iter().map(|g| json!({"mailbox": g.mailbox, "perms": g.perms, "subtree": g.subtree})).collect::<Vec<_>>(),
        "tokens": u.tokens.iter().map(|t| json!({"id": t.id, "label": t.label, "created_ms": t.created_ms, "expires_ms": t.expires_ms})).collect::<Vec<_>>(),
    })
}

/// Text from the cluster as it may be printed to a terminal (a key's
/// comment or a token's label comes from whoever made it).
fn clean(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

fn print_user(u: &pb::UserInfo, json: bool) {
    if json {
        println!("{}", user_json(u));
        return;
    }
    let root = if u.root.is_empty() { "/" } else { &u.root };
    println!(
        "{}  {}  root {}{}{}",
        u.name,
        u.role,
        root,
        if u.has_password { "  password" } else { "" },
        if u.disabled { "  DISABLED" } else { "" }
    );
    for k in &u.keys {
        println!(
            "  key    {} {} {}",
            clean(&k.algorithm),
            k.fingerprint,
            clean(&k.comment)
        );
    }
    for g in &u.grants {
        let scope = if g.subtree { "and below" } else { "only" };
        println!("  grant  {} {} ({scope})", g.mailbox, g.perms);
    }
    for t in &u.tokens {
        println!("  token  {} {}", t.id, clean(&t.label));
    }
}

/// Runs a `mailbox user` command.
pub async fn user(client: &Client, json: bool, cmd: &UserCmd) -> anyhow::Result<()> {
    let mut api = client.accounts();
    let info = match cmd {
        UserCmd::Add {
            name,
            role,
            root,
            password_file,
            password_stdin,
            key_file,
        } => {
            let password = read_password(password_file, *password_stdin)?;
            let key = match key_file {
                Some(f) => Some(
                    std::fs::read_to_string(f)
                        .with_context(|| format!("reading {}", f.display()))?,
                ),
                None => None,
            };
            let mut u = api
                .put_user(pb::PutUserRequest {
                    name: name.clone(),
                    role: role.clone(),
                    root: root.clone().unwrap_or_default(),
                    password,
                    disabled: false,
                    create: true,
                })
                .await
                .map_err(st)?
                .into_inner();
            if let Some(k) = key {
                u = api
                    .add_key(pb::AddKeyRequest {
                        name: name.clone(),
                        public_key: k,
                    })
                    .await
                    .map_err(st)?
                    .into_inner();
            }
            u
        }
        UserCmd::Passwd {
            name,
            password_file,
            password_stdin,
        } => {
            let password = read_password(password_file, *password_stdin)?;
            anyhow::ensure!(
                !password.is_empty(),
                "give the password with --password-file or --password-stdin"
            );
            let cur = current(&mut api, name).await?;
            api.put_user(pb::PutUserRequest {
                name: name.clone(),
                role: cur.role,
                root: cur.root,
                password,
                disabled: cur.disabled,
                create: false,
            })
            .await
            .map_err(st)?
            .into_inner()
        }
        UserCmd::Disable { name, enable } => {
            let cur = current(&mut api, name).await?;
            api.put_user(pb::PutUserRequest {
                name: name.clone(),
                role: cur.role,
                root: cur.root,
                password: String::new(),
                disabled: !enable,
                create: false,
            })
            .await
            .map_err(st)?
            .into_inner()
        }
        UserCmd::Rm { name } => {
            api.delete_user(pb::DeleteUserRequest { name: name.clone() })
                .await
                .map_err(st)?;
            eprintln!("user {name} deleted");
            return Ok(());
        }
        UserCmd::Key { cmd } => match cmd {
            KeyCmd::Add { name, file } => {
                let k = std::fs::read_to_string(file)
                    .with_context(|| format!("reading {}", file.display()))?;
                api.add_key(pb::AddKeyRequest {
                    name: name.clone(),
                    public_key: k,
                })
                .await
                .map_err(st)?
                .into_inner()
            }
            KeyCmd::Rm { name, fingerprint } => api
                .remove_key(pb::RemoveKeyRequest {
                    name: name.clone(),
                    fingerprint: fingerprint.clone(),
                })
                .await
                .map_err(st)?
                .into_inner(),
        },
        UserCmd::Token { cmd } => match cmd {
            TokenCmd::Add { name, label, ttl } => {
                let r = api
                    .add_token(pb::AddTokenRequest {
                        name: name.clone(),
                        label: label.clone(),
                        ttl_ms: ttl.map_or(0, |t| t.get().as_millis() as i64),
                    })
                    .await
                    .map_err(st)?
                    .into_inner();
                let t = r.token.unwrap_or_default();
                if json {
                    println!(
                        "{}",
                        json!({"id": t.id, "label": t.label, "expires_ms": t.expires_ms, "token": r.secret})
                    );
                } else {
                    eprintln!("token {} for {name}: shown this once, keep it", t.id);
                    println!("{}", r.secret);
                }
                return Ok(());
            }
            TokenCmd::Revoke { id } => api
                .revoke_token(pb::RevokeTokenRequest { id: id.clone() })
                .await
                .map_err(st)?
                .into_inner(),
        },
        UserCmd::Grant {
            name,
            mailbox,
            perms,
            no_subtree,
        } => api
            .grant(pb::GrantRequest {
                name: name.clone(),
                mailbox: mailbox.clone(),
                perms: perms.clone(),
                no_subtree: *no_subtree,
            })
            .await
            .map_err(st)?
            .into_inner(),
        UserCmd::Revoke { name, mailbox } => api
            .revoke(pb::RevokeRequest {
                name: name.clone(),
                mailbox: mailbox.clone(),
            })
            .await
            .map_err(st)?
            .into_inner(),
        UserCmd::Ls => {
            let users = api
                .list_users(pb::ListUsersRequest {})
                .await
                .map_err(st)?
                .into_inner()
                .users;
            if json {
                println!(
                    "{}",
                    serde_json::Value::Array(users.iter().map(user_json).collect())
                );
            } else {
                for u in &users {
                    print_user(u, false);
                }
            }
            return Ok(());
        }
    };
    print_user(&info, json);
    Ok(())
}

async fn current(
    api: &mut pb::accounts_client::AccountsClient<tonic::transport::Channel>,
    name: &str,
) -> anyhow::Result<pb::UserInfo> {
    api.list_users(pb::ListUsersRequest {})
        .await
        .map_err(st)?
        .into_inner()
        .users
        .into_iter()
        .find(|u| u.name == name)
        .ok_or_else(|| anyhow::anyhow!("user {name} does not exist"))
}
