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
    let r = apply(kv, &mut ov, &ApplyCtx::new("east"), &cmd);
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
        Ok(CommandResult::Message {
            deduplicated: false,
            ..
        })
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
    run(&mut kv, Command::DeleteMessage { id: m.id, at_ms: 5 }).unwrap();
    assert!(get_message(&kv, &m.id).unwrap().is_none());
    assert!(inline_payload(&kv, &m.id).unwrap().is_none());
    assert_eq!(
        list_messages(&kv, &mb("/inbox"), None, 10).unwrap(),
        vec![m2]
    );
    assert!(matches!(
        run(&mut kv, Command::DeleteMessage { id: m.id, at_ms: 5 }),
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
        &ApplyCtx::new("east"),
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
        &ApplyCtx::new("east"),
        &Command::PutMessage {
            meta: b.clone(),
            inline: None,
            idempotency_key: Some("k1".into()),
        },
    )
    .unwrap();
    kv.commit(ov);
    assert_eq!(
        ra,
        CommandResult::Message {
            meta: a.clone(),
            deduplicated: false
        }
    );
    assert_eq!(
        rb,
        CommandResult::Message {
            meta: a.clone(),
            deduplicated: true
        }
    );
    assert!(get_message(&kv, &b.id).unwrap().is_none());
    // Same key in another mailbox is independent.
    create(&mut kv, "/other", false).unwrap();
    let c = meta("/other", "x");
    assert!(matches!(
        put(&mut kv, &c, Some("k1")),
        Ok(CommandResult::Message {
            deduplicated: false,
            ..
        })
    ));
    // After delete the key is free again.
    run(&mut kv, Command::DeleteMessage { id: a.id, at_ms: 5 }).unwrap();
    let d = meta("/inbox", "x");
    assert!(matches!(
        put(&mut kv, &d, Some("k1")),
        Ok(CommandResult::Message {
            deduplicated: false,
            ..
        })
    ));
}

#[test]
fn apply_is_deterministic() {
    let cmds = {
        let m = meta("/inbox", "x");
        vec![
            Command::CreateMailbox {
                path: mb("/inbox"),
                parents: true,
                created_ms: 1,
            },
            Command::PutMessage {
                meta: m.clone(),
                inline: Some(vec![1, 2, 3]),
                idempotency_key: Some("z".into()),
            },
            Command::PutMessage {
                meta: meta("/inbox", "y"),
                inline: None,
                idempotency_key: None,
            },
            Command::DeleteMessage { id: m.id, at_ms: 5 },
        ]
    };
    let replay = || {
        let mut kv = MemKv::default();
        let rs: Vec<_> = cmds.iter().map(|c| run(&mut kv, c.clone())).collect();
        (kv.0, rs)
    };
    assert_eq!(replay(), replay());
}

mod replication {
    use super::*;
    use crate::replication::{
        complete_ms, cursor, feed_head, feed_since, holders, missing_payloads,
    };
    use mailbox_types::SegmentMeta;

    struct Dc {
        kv: MemKv,
        ctx: ApplyCtx,
    }

    impl Dc {
        fn new(name: &str) -> Self {
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
        /// Pulls everything new from `from`'s feed, as the replicator does.
        fn pull(&mut self, from: &Dc) -> u64 {
            let since = cursor(&self.kv, &from.ctx.local_dc).unwrap();
            let records = feed_since(&from.kv, since, 1000).unwrap();
            match self
                .run(Command::ApplyRemote {
                    origin: from.ctx.local_dc.clone(),
                    records,
                })
                .unwrap()
            {
                CommandResult::Remote { applied, .. } => applied,
                other => panic!("{other:?}"),
            }
        }
    }

    fn segmented(mailbox: &str) -> MessageMeta {
        let mut m = meta(mailbox, "big");
        m.payload = Payload::Segments {
            segment_size: 4,
            segments: vec![SegmentMeta {
                index: 0,
                size: 3,
                sha256: Digest::of(b"abc"),
            }],
        };
        m
    }

    #[test]
    fn inline_message_replicates_and_completes_at_origin() {
        let (mut east, mut west) = (Dc::new("east"), Dc::new("west"));
        east.run(Command::CreateMailbox {
            path: mb("/a/inbox"),
            parents: true,
            created_ms: 1,
        })
        .unwrap();
        let m = meta("/a/inbox", "x");
        east.run(Command::PutMessage {
            meta: m.clone(),
            inline: Some(b"abc".to_vec()),
            idempotency_key: None,
        })
        .unwrap();
        assert_eq!(
            complete_ms(&east.kv, &m.id).unwrap(),
            None,
            "west does not hold it yet"
        );
        // mailbox /a, /a/inbox, message
        assert_eq!(west.pull(&east), 3);
        assert_eq!(get_message(&west.kv, &m.id).unwrap().unwrap(), m);
        assert_eq!(inline_payload(&west.kv, &m.id).unwrap().unwrap(), b"abc");
        assert!(get_mailbox(&west.kv, &mb("/a")).unwrap().is_some());
        // Exactly once: pulling again applies nothing.
        assert_eq!(west.pull(&east), 0);
        // West acknowledges in its own feed; east learns and completes.
        assert_eq!(feed_head(&west.kv).unwrap(), 1);
        assert_eq!(east.pull(&west), 1);
        let hs: Vec<_> = holders(&east.kv, &m.id)
            .unwrap()
            .into_iter()
            .map(|(d, _)| d)
            .collect();
        assert_eq!(hs, ["east", "west"]);
        assert!(complete_ms(&east.kv, &m.id).unwrap().is_some());
        // Only the origin records completion.
        west.pull(&east);
        assert_eq!(complete_ms(&west.kv, &m.id).unwrap(), None);
    }

    #[test]
    fn segmented_message_waits_for_payload_held() {
        let (mut east, mut west) = (Dc::new("east"), Dc::new("west"));
        east.run(Command::CreateMailbox {
            path: mb("/in"),
            parents: false,
            created_ms: 1,
        })
        .unwrap();
        let m = segmented("/in");
        east.run(Command::PutMessage {
            meta: m.clone(),
            inline: None,
            idempotency_key: None,
        })
        .unwrap();
        west.pull(&east);
        assert_eq!(missing_payloads(&west.kv, 10).unwrap(), vec![m.clone()]);
        assert_eq!(
            feed_head(&west.kv).unwrap(),
            0,
            "no ack before the payload is here"
        );
        west.run(Command::PayloadHeld {
            id: m.id,
            at_ms: 50,
        })
        .unwrap();
        assert!(missing_payloads(&west.kv, 10).unwrap().is_empty());
        // Idempotent: a second PayloadHeld adds no second ack.
        west.run(Command::PayloadHeld {
            id: m.id,
            at_ms: 60,
        })
        .unwrap();
        assert_eq!(feed_head(&west.kv).unwrap(), 1);
        east.pull(&west);
        assert_eq!(complete_ms(&east.kv, &m.id).unwrap(), Some(50));
    }

    #[test]
    fn deletes_replicate_and_tombstones_prevent_resurrection() {
        let (mut east, mut west) = (Dc::new("east"), Dc::new("west"));
        east.run(Command::CreateMailbox {
            path: mb("/in"),
            parents: false,
            created_ms: 1,
        })
        .unwrap();
        let m = segmented("/in");
        east.run(Command::PutMessage {
            meta: m.clone(),
            inline: None,
            idempotency_key: None,
        })
        .unwrap();
        west.pull(&east);
        east.run(Command::DeleteMessage { id: m.id, at_ms: 9 })
            .unwrap();
        west.pull(&east);
        assert!(get_message(&west.kv, &m.id).unwrap().is_none());
        assert!(
            missing_payloads(&west.kv, 10).unwrap().is_empty(),
            "deleted message no longer fetched"
        );
        assert!(list_messages(&west.kv, &mb("/in"), None, 10)
            .unwrap()
            .is_empty());
        // A late record of the deleted message (e.g. replayed from a backup
        // feed) does not bring it back.
        let mut ov = Overlay::new();
        crate::replication::apply_remote(
            &west.kv,
            &mut ov,
            &west.ctx,
            "east",
            &[(
                100,
                FeedRecord::Message {
                    meta: m.clone(),
                    inline: None,
                },
            )],
        )
        .unwrap();
        west.kv.commit(ov);
        assert!(get_message(&west.kv, &m.id).unwrap().is_none());
        // PayloadHeld for a deleted message is a no-op.
        west.run(Command::PayloadHeld { id: m.id, at_ms: 1 })
            .unwrap();
    }

    #[test]
    fn refused_commands_roll_back_and_own_feed_is_not_remote() {
        let mut east = Dc::new("east");
        assert!(east
            .run(Command::ApplyRemote {
                origin: "east".into(),
                records: vec![]
            })
            .is_err());
        // A put into a missing mailbox writes nothing, feed included.
        assert!(east
            .run(Command::PutMessage {
                meta: meta("/none", "x"),
                inline: None,
                idempotency_key: None
            })
            .is_err());
        assert_eq!(feed_head(&east.kv).unwrap(), 0);
    }
}
