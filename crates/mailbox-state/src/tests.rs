use std::collections::BTreeMap;

use mailbox_types::{Digest, Payload};

use super::*;

fn mb(p: &str) -> MailboxPath {
    MailboxPath::parse(p).unwrap()
}

fn meta(mailbox: &str, name: &str) -> MessageMeta {
    MessageMeta {
        id: MessageId::new(),
        mailbox: mb(mailbox),
        name: name.into(),
        size: 3,
        sha256: Digest::of(b"abc"),
        created_ms: 1,
        origin_dc: "east".into(),
        attributes: BTreeMap::new(),
        payload: Payload::Inline,
    }
}

fn run(kv: &mut MemKv, cmd: Command) -> CommandResponse {
    let mut ov = Overlay::new();
    let r = apply(kv, &mut ov, &cmd);
    if r.is_err() {
        assert!(ov.is_empty(), "refused command wrote {} keys", ov.len());
    }
    kv.commit(ov);
    r
}

fn create(kv: &mut MemKv, p: &str, parents: bool) -> CommandResponse {
    run(
        kv,
        Command::CreateMailbox {
            path: mb(p),
            parents,
            created_ms: 7,
        },
    )
}

fn put(kv: &mut MemKv, m: &MessageMeta, key: Option<&str>) -> CommandResponse {
    run(
        kv,
        Command::PutMessage {
            meta: m.clone(),
            inline: Some(b"abc".to_vec()),
            idempotency_key: key.map(String::from),
        },
    )
}

#[test]
fn mailbox_create_rules() {
    let mut kv = MemKv::default();
    assert!(matches!(
        create(&mut kv, "/a/b", false),
        Err(StateError::ParentNotFound { .. })
    ));
    assert!(create(&mut kv, "/a/b", true).is_ok());
    assert!(get_mailbox(&kv, &mb("/a")).unwrap().is_some());
    assert!(matches!(
        create(&mut kv, "/a/b", false),
        Err(StateError::MailboxExists { .. })
    ));
    assert!(matches!(
        create(&mut kv, "/a/b", true),
        Ok(CommandResult::Mailbox { created: false, .. })
    ));
    let all: Vec<_> = list_mailboxes(&kv, "")
        .unwrap()
        .into_iter()
        .map(|r| r.path.to_string())
        .collect();
    assert_eq!(all, ["/a", "/a/b"]);
}

#[test]
fn put_list_delete() {
    let mut kv = MemKv::default();
    let m = meta("/inbox", "x");
    assert!(matches!(
        put(&mut kv, &m, None),
        Err(StateError::MailboxNotFound { .. })
    ));
    create(&mut kv, "/inbox", false).unwrap();
    put(&mut kv, &m, None).unwrap();
    // A replayed proposal is the same success...
    assert!(matches!(
        put(&mut kv, &m, None),
        Ok(CommandResult::Message { deduplicated: false, .. })
    ));
    // ...but a different message under the same id is refused.
    let mut clash = m.clone();
    clash.name = "other".into();
    assert!(matches!(
        put(&mut kv, &clash, None),
        Err(StateError::MessageExists { .. })
    ));
    let m2 = meta("/inbox", "y");
    put(&mut kv, &m2, None).unwrap();
    let l = list_messages(&kv, &mb("/inbox"), None, 10).unwrap();
    assert_eq!(l, vec![m.clone(), m2.clone()]);
    let l = list_messages(&kv, &mb("/inbox"), Some(&m.id), 10).unwrap();
    assert_eq!(l, vec![m2.clone()]);
    assert_eq!(inline_payload(&kv, &m.id).unwrap().unwrap(), b"abc");
    run(&mut kv, Command::DeleteMessage { id: m.id }).unwrap();
    assert!(get_message(&kv, &m.id).unwrap().is_none());
    assert!(inline_payload(&kv, &m.id).unwrap().is_none());
    assert_eq!(list_messages(&kv, &mb("/inbox"), None, 10).unwrap(), vec![m2]);
    assert!(matches!(
        run(&mut kv, Command::DeleteMessage { id: m.id }),
        Err(StateError::MessageNotFound { .. })
    ));
}

#[test]
fn idempotency_returns_original_even_in_one_batch() {
    let mut kv = MemKv::default();
    create(&mut kv, "/inbox", false).unwrap();
    let a = meta("/inbox", "x");
    let b = meta("/inbox", "x");
    // Both in one apply batch: the second must see the first's writes.
    let mut ov = Overlay::new();
    let ra = apply(
        &kv,
        &mut ov,
        &Command::PutMessage {
            meta: a.clone(),
            inline: None,
            idempotency_key: Some("k1".into()),
        },
    )
    .unwrap();
    let rb = apply(
        &kv,
        &mut ov,
        &Command::PutMessage {
            meta: b.clone(),
            inline: None,
            idempotency_key: Some("k1".into()),
        },
    )
    .unwrap();
    kv.commit(ov);
    assert_eq!(ra, CommandResult::Message { meta: a.clone(), deduplicated: false });
    assert_eq!(rb, CommandResult::Message { meta: a.clone(), deduplicated: true });
    assert!(get_message(&kv, &b.id).unwrap().is_none());
    // Same key in another mailbox is independent.
    create(&mut kv, "/other", false).unwrap();
    let c = meta("/other", "x");
    assert!(matches!(
        put(&mut kv, &c, Some("k1")),
        Ok(CommandResult::Message { deduplicated: false, .. })
    ));
    // After delete the key is free again.
    run(&mut kv, Command::DeleteMessage { id: a.id }).unwrap();
    let d = meta("/inbox", "x");
    assert!(matches!(
        put(&mut kv, &d, Some("k1")),
        Ok(CommandResult::Message { deduplicated: false, .. })
    ));
}

#[test]
fn apply_is_deterministic() {
    let cmds = {
        let m = meta("/inbox", "x");
        vec![
            Command::CreateMailbox { path: mb("/inbox"), parents: true, created_ms: 1 },
            Command::PutMessage { meta: m.clone(), inline: Some(vec![1, 2, 3]), idempotency_key: Some("z".into()) },
            Command::PutMessage { meta: meta("/inbox", "y"), inline: None, idempotency_key: None },
            Command::DeleteMessage { id: m.id },
        ]
    };
    let replay = || {
        let mut kv = MemKv::default();
        let rs: Vec<_> = cmds.iter().map(|c| run(&mut kv, c.clone())).collect();
        (kv.0, rs)
    };
    assert_eq!(replay(), replay());
}
