//! The Accounts gRPC service: users, SSH keys, tokens and grants, written
//! through the DC log as replicated configuration (see
//! `mailbox_state::accounts`). Passwords are hashed here, on the node, so
//! the log and the feed only ever carry argon2id hashes; token secrets are
//! returned once and only their SHA-256 is kept.

use mailbox_proto::v1::accounts_server::Accounts;
use mailbox_proto::v1::{
    AddKeyRequest, AddTokenRequest, AddTokenResponse, DeleteUserRequest, DeleteUserResponse,
    GrantInfo, GrantRequest, KeyInfo, ListUsersRequest, ListUsersResponse, PutUserRequest,
    RemoveKeyRequest, RevokeRequest, RevokeTokenRequest, TokenInfo, UserInfo,
};
use mailbox_raft::RaftNode;
use mailbox_state::accounts as acc;
use mailbox_state::Command;
use mailbox_types::account::{
    validate_user_name, AccountKey, AccountValue, Grant, Perms, Role, SshKey, User,
};
use mailbox_types::{now_ms, MailboxPath};
use tonic::{Request, Response, Status};

use crate::error::ServiceError;

/// The Accounts service of one node.
pub struct AccountsService {
    raft: RaftNode,
}

impl AccountsService {
    /// A service writing through `raft`.
    pub fn new(raft: RaftNode) -> Self {
        AccountsService { raft }
    }

    async fn set(&self, key: AccountKey, value: Option<AccountValue>) -> Result<(), ServiceError> {
        self.raft
            .propose(Command::SetAccount {
                key,
                value,
                wall_ms: now_ms(),
            })
            .await??;
        Ok(())
    }

    fn user(&self, name: &str) -> Result<User, ServiceError> {
        acc::get_user(self.raft.view(), name)?.ok_or_else(|| ServiceError::NotFound {
            what: format!("user {name}"),
        })
    }

    fn info(&self, user: &User) -> Result<UserInfo, ServiceError> {
        let view = self.raft.view();
        let grants = acc::user_grants(view, &user.name)?
            .into_iter()
            .filter(|g| g.incarnation == user.incarnation)
            .map(|g| GrantInfo {
                mailbox: g.mailbox.to_string(),
                perms: g.perms.to_string(),
                subtree: g.subtree,
            })
            .collect();
        let tokens = acc::list_tokens(view)?
            .into_iter()
            .filter(|t| t.user == user.name && t.incarnation == user.incarnation)
            .map(|t| TokenInfo {
                id: t.id,
                label: t.label,
                created_ms: t.created_ms,
                expires_ms: t.expires_ms.unwrap_or(0),
            })
            .collect();
        Ok(UserInfo {
            name: user.name.clone(),
            role: user.role.to_string(),
            root: user
                .root
                .as_ref()
                .map(|r| r.to_string())
                .unwrap_or_default(),
            has_password: user.password_hash.is_some(),
            disabled: user.disabled,
            keys: user
                .ssh_keys
                .iter()
                .map(|k| KeyInfo {
                    algorithm: k.algorithm.clone(),
                    fingerprint: k.fingerprint(),
                    comment: k.comment.clone(),
                })
                .collect(),
            grants,
            tokens,
        })
    }

    /// Writes `user` and answers it as stored.
    async fn save_user(&self, user: User) -> Result<Response<UserInfo>, ServiceError> {
        let name = user.name.clone();
        self.set(
            AccountKey::User(name.clone()),
            Some(AccountValue::User(user)),
        )
        .await?;
        self.info_of(&name)
    }

    /// The user as stored after a write (read back, so the answer shows
    /// what every DC will have).
    fn info_of(&self, name: &str) -> Result<Response<UserInfo>, ServiceError> {
        let u = self.user(name)?;
        Ok(Response::new(self.info(&u)?))
    }
}

fn invalid(e: impl ToString) -> ServiceError {
    ServiceError::InvalidArgument {
        reason: e.to_string(),
    }
}

fn mailbox(s: &str) -> Result<MailboxPath, ServiceError> {
    MailboxPath::parse(s).map_err(invalid)
}

async fn hash(password: String) -> Result<String, ServiceError> {
    tokio::task::spawn_blocking(move || mailbox_auth::hash_password(&password))
        .await
        .map_err(|e| ServiceError::Internal {
            reason: format!("hashing: {e}"),
        })?
        .map_err(|e| ServiceError::Internal {
            reason: e.to_string(),
        })
}

#[tonic::async_trait]
impl Accounts for AccountsService {
    #[tracing::instrument(level = "info", skip_all, fields(user = %req.get_ref().name))]
    async fn put_user(&self, req: Request<PutUserRequest>) -> Result<Response<UserInfo>, Status> {
        let r = req.into_inner();
        validate_user_name(&r.name).map_err(invalid)?;
        let existing = acc::get_user(self.raft.view(), &r.name).map_err(ServiceError::from)?;
        if r.create && existing.is_some() {
            return Err(ServiceError::AlreadyExists {
                what: format!("user {}", r.name),
            }
            .into());
        }
        let role = if r.role.is_empty() {
            existing.as_ref().map_or(Role::Partner, |u| u.role)
        } else {
            Role::parse(&r.role).map_err(invalid)?
        };
        // Empty keeps the root (a client changing only the password must
        // not widen the user's view to the whole tree); `/` clears it.
        let root = match r.root.as_str() {
            "" => existing.as_ref().and_then(|u| u.root.clone()),
            "/" => None,
            s => Some(mailbox(s)?),
        };
        let password_hash = if r.password.is_empty() {
            existing.as_ref().and_then(|u| u.password_hash.clone())
        } else {
            Some(hash(r.password).await?)
        };
        // An update names the incarnation it was made from: the state
        // machine refuses it if that user was deleted (or made again)
        // meanwhile, rather than re-creating it.
        let incarnation = existing.as_ref().map_or(0, |u| u.incarnation);
        let user = User {
            name: r.name.clone(),
            role,
            password_hash,
            ssh_keys: existing.map(|u| u.ssh_keys).unwrap_or_default(),
            root,
            disabled: r.disabled,
            incarnation,
            created: Default::default(),
        };
        Ok(self.save_user(user).await?)
    }

    #[tracing::instrument(level = "info", skip_all, fields(user = %req.get_ref().name))]
    async fn delete_user(
        &self,
        req: Request<DeleteUserRequest>,
    ) -> Result<Response<DeleteUserResponse>, Status> {
        let r = req.into_inner();
        self.set(AccountKey::User(r.name), None).await?;
        Ok(Response::new(DeleteUserResponse {}))
    }

    #[tracing::instrument(level = "info", skip_all, fields(user = %req.get_ref().name))]
    async fn add_key(&self, req: Request<AddKeyRequest>) -> Result<Response<UserInfo>, Status> {
        let r = req.into_inner();
        let key = SshKey::parse(r.public_key.trim()).map_err(invalid)?;
        let mut user = self.user(&r.name)?;
        if !user.ssh_keys.iter().any(|k| k.blob == key.blob) {
            user.ssh_keys.push(key);
        }
        Ok(self.save_user(user).await?)
    }

    #[tracing::instrument(level = "info", skip_all, fields(user = %req.get_ref().name))]
    async fn remove_key(
        &self,
        req: Request<RemoveKeyRequest>,
    ) -> Result<Response<UserInfo>, Status> {
        let r = req.into_inner();
        let mut user = self.user(&r.name)?;
        let before = user.ssh_keys.len();
        user.ssh_keys.retain(|k| k.fingerprint() != r.fingerprint);
        if user.ssh_keys.len() == before {
            return Err(ServiceError::NotFound {
                what: format!("key {} of user {}", r.fingerprint, r.name),
            }
            .into());
        }
        Ok(self.save_user(user).await?)
    }

    #[tracing::instrument(level = "info", skip_all, fields(user = %req.get_ref().name))]
    async fn add_token(
        &self,
        req: Request<AddTokenRequest>,
    ) -> Result<Response<AddTokenResponse>, Status> {
        let r = req.into_inner();
        if r.ttl_ms < 0 {
            return Err(invalid("a token's lifetime cannot be negative").into());
        }
        let user = self.user(&r.name)?;
        let now = now_ms();
        let expires = (r.ttl_ms > 0).then(|| now.saturating_add(r.ttl_ms));
        let (token, secret) = mailbox_auth::new_token(&user, &r.label, now, expires);
        let info = TokenInfo {
            id: token.id.clone(),
            label: token.label.clone(),
            created_ms: token.created_ms,
            expires_ms: token.expires_ms.unwrap_or(0),
        };
        self.set(
            AccountKey::Token(token.id.clone()),
            Some(AccountValue::Token(token)),
        )
        .await?;
        Ok(Response::new(AddTokenResponse {
            token: Some(info),
            secret,
        }))
    }

    #[tracing::instrument(level = "info", skip_all, fields(token = %req.get_ref().id))]
    async fn revoke_token(
        &self,
        req: Request<RevokeTokenRequest>,
    ) -> Result<Response<UserInfo>, Status> {
        let r = req.into_inner();
        let token = acc::get_token(self.raft.view(), &r.id)
            .map_err(ServiceError::from)?
            .ok_or_else(|| ServiceError::NotFound {
                what: format!("token {}", r.id),
            })?;
        self.set(AccountKey::Token(r.id), None).await?;
        Ok(self.info_of(&token.user)?)
    }

    #[tracing::instrument(level = "info", skip_all, fields(user = %req.get_ref().name, mailbox = %req.get_ref().mailbox))]
    async fn grant(&self, req: Request<GrantRequest>) -> Result<Response<UserInfo>, Status> {
        let r = req.into_inner();
        let mb = mailbox(&r.mailbox)?;
        let perms = Perms::parse(&r.perms).map_err(invalid)?;
        self.user(&r.name)?;
        let g = Grant {
            user: r.name.clone(),
            incarnation: 0,
            mailbox: mb.clone(),
            perms,
            subtree: !r.no_subtree,
        };
        self.set(
            AccountKey::Grant(r.name.clone(), mb),
            Some(AccountValue::Grant(g)),
        )
        .await?;
        Ok(self.info_of(&r.name)?)
    }

    #[tracing::instrument(level = "info", skip_all, fields(user = %req.get_ref().name, mailbox = %req.get_ref().mailbox))]
    async fn revoke(&self, req: Request<RevokeRequest>) -> Result<Response<UserInfo>, Status> {
        let r = req.into_inner();
        let mb = mailbox(&r.mailbox)?;
        self.set(AccountKey::Grant(r.name.clone(), mb), None)
            .await?;
        Ok(self.info_of(&r.name)?)
    }

    async fn list_users(
        &self,
        _req: Request<ListUsersRequest>,
    ) -> Result<Response<ListUsersResponse>, Status> {
        let users = acc::list_users(self.raft.view())
            .map_err(ServiceError::from)?
            .iter()
            .map(|u| self.info(u))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Response::new(ListUsersResponse { users }))
    }
}
