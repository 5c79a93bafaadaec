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

#[test]
fn batch_applies_each_command_alone_in_order() {
    let mut kv = MemKv::default();
    let m = meta("/inbox", "a");
    let r = run(
        &mut kv,
        Command::Batch(vec![
            Command::CreateMailbox {
                path: mb("/inbox"),
                parents: false,
                created_ms: 1,
            },
            // Refused: writes nothing, the others still apply.
            Command::CreateMailbox {
                path: mb("/inbox"),
                parents: false,
                created_ms: 2,
            },
            Command::PutMessage {
                meta: m.clone(),
                inline: Some(b"abc".to_vec()),
                idempotency_key: Some("k".into()),
            },
        ]),
    )
    .unwrap();
    let CommandResult::Batch(rs) = r else {
        panic!("{r:?}")
    };
    assert!(rs[0].is_ok());
    assert!(matches!(rs[1], Err(StateError::MailboxExists { .. })));
    assert!(matches!(
        rs[2],
        Ok(CommandResult::Message {
            deduplicated: false,
            ..
        })
    ));
    assert_eq!(
        get_mailbox(&kv, &mb("/inbox")).unwrap().unwrap().created_ms,
        1
    );
    assert_eq!(get_message(&kv, &m.id).unwrap().unwrap(), m);
}

mod replication {
    use super::*;
    use crate::replication::{
        attribute_registers, complete_ms, cursor, feed_head, feed_since, holders, missing_payloads,
        tombstone, tombstone_count,
    };
    use mailbox_types::SegmentMeta;

    struct Dc {
        kv: MemKv,
        ctx: ApplyCtx,
    }

    impl Dc {
        fn new(name: &str) -> Self {
            Self::in_cluster(name, &["east", "west"])
        }
        fn in_cluster(name: &str, dcs: &[&str]) -> Self {
            let mut dc = Dc {
                kv: MemKv::default(),
                ctx: ApplyCtx::new(name),
            };
            dc.run(Command::SetClusterDcs {
                dcs: dcs.iter().map(|d| d.to_string()).collect(),
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
                    received_ms: 1000,
                    payload_here: vec![],
                })
                .unwrap()
            {
                CommandResult::Remote { applied, .. } => applied,
                other => panic!("{other:?}"),
            }
        }
    }

    /// Creates `/in` in `dc` and stores a segmented message there.
    fn put_segmented(dc: &mut Dc) -> MessageMeta {
        dc.run(Command::CreateMailbox {
            path: mb("/in"),
            parents: false,
            created_ms: 1,
        })
        .unwrap();
        let m = segmented("/in");
        dc.run(Command::PutMessage {
            meta: m.clone(),
            inline: None,
            idempotency_key: None,
        })
        .unwrap();
        m
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
        let m = put_segmented(&mut east);
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
    fn payload_pushed_with_the_record_is_held_on_arrival() {
        let (mut east, mut west) = (Dc::new("east"), Dc::new("west"));
        let m = put_segmented(&mut east);
        let records = feed_since(&east.kv, 0, 100).unwrap();
        west.run(Command::ApplyRemote {
            origin: "east".into(),
            records,
            received_ms: 77,
            payload_here: vec![m.id],
        })
        .unwrap();
        assert!(missing_payloads(&west.kv, 10).unwrap().is_empty());
        assert_eq!(feed_head(&west.kv).unwrap(), 1, "replica ack at once");
        east.pull(&west);
        assert_eq!(complete_ms(&east.kv, &m.id).unwrap(), Some(77));
    }

    #[test]
    fn deletes_replicate_and_tombstones_prevent_resurrection() {
        let (mut east, mut west) = (Dc::new("east"), Dc::new("west"));
        let m = put_segmented(&mut east);
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
        // A re-delivered copy of the message's record (a replicator retry
        // after a lost reply) does not bring it back.
        let records = feed_since(&east.kv, 0, 100).unwrap();
        assert_eq!(
            west.run(Command::ApplyRemote {
                origin: "east".into(),
                records,
                received_ms: 1000,
                payload_here: vec![],
            })
            .unwrap(),
            CommandResult::Remote {
                applied: 0,
                cursor: 3
            }
        );
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
                records: vec![],
                received_ms: 1000,
                payload_here: vec![],
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

    #[test]
    fn a_batch_that_skips_feed_records_is_refused_whole() {
        let (mut east, mut west) = (Dc::new("east"), Dc::new("west"));
        east.run(Command::CreateMailbox {
            path: mb("/a/b/c"),
            parents: true,
            created_ms: 1,
        })
        .unwrap();
        let records = feed_since(&east.kv, 0, 10).unwrap();
        assert_eq!(records.len(), 3);
        // Records 2..3 arrive before record 1 (a stale or reordered proposal).
        let late = Command::ApplyRemote {
            origin: "east".into(),
            records: records[1..].to_vec(),
            received_ms: 1000,
            payload_here: vec![],
        };
        assert!(matches!(
            west.run(late.clone()),
            Err(StateError::FeedGap {
                cursor: 0,
                next: 2,
                ..
            })
        ));
        assert_eq!(cursor(&west.kv, "east").unwrap(), 0);
        assert!(get_mailbox(&west.kv, &mb("/a/b")).unwrap().is_none());
        // In order, all three apply once; the late batch is then a no-op.
        assert_eq!(west.pull(&east), 3);
        match west.run(late).unwrap() {
            CommandResult::Remote { applied, cursor } => assert_eq!((applied, cursor), (0, 3)),
            other => panic!("{other:?}"),
        }
    }

    /// Pulls between every pair until nothing new moves; returns the DCs.
    fn converge(dcs: &mut [Dc]) {
        loop {
            let mut moved = 0;
            for i in 0..dcs.len() {
                for j in 0..dcs.len() {
                    if i != j {
                        let from = Dc {
                            kv: dcs[j].kv.clone(),
                            ctx: dcs[j].ctx.clone(),
                        };
                        moved += dcs[i].pull(&from);
                    }
                }
            }
            if moved == 0 {
                return;
            }
        }
    }

    fn pull_from(dcs: &mut [Dc], to: usize, from: usize) -> u64 {
        let src = Dc {
            kv: dcs[from].kv.clone(),
            ctx: dcs[from].ctx.clone(),
        };
        dcs[to].pull(&src)
    }

    fn put_inline(dc: &mut Dc, mailbox: &str) -> MessageMeta {
        dc.run(Command::CreateMailbox {
            path: mb(mailbox),
            parents: true,
            created_ms: 1,
        })
        .unwrap();
        let mut m = meta(mailbox, "x");
        m.origin_dc = dc.ctx.local_dc.clone();
        m.attributes.insert("from".into(), "upload".into());
        dc.run(Command::PutMessage {
            meta: m.clone(),
            inline: Some(b"abc".to_vec()),
            idempotency_key: None,
        })
        .unwrap();
        m
    }

    fn set_attr(dc: &mut Dc, id: MessageId, k: &str, v: &str, wall_ms: i64) -> MessageMeta {
        match dc
            .run(Command::SetAttributes {
                id,
                set: BTreeMap::from([(k.to_string(), v.to_string())]),
                remove: vec![],
                wall_ms,
            })
            .unwrap()
        {
            CommandResult::Updated { meta } => meta,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn tombstones_are_purged_once_every_dc_acknowledged() {
        let mut dcs = [Dc::new("east"), Dc::new("west")];
        let m = put_inline(&mut dcs[0], "/in");
        converge(&mut dcs);
        dcs[0]
            .run(Command::DeleteMessage { id: m.id, at_ms: 9 })
            .unwrap();
        assert!(tombstone(&dcs[0].kv, &m.id).unwrap().is_some());
        // West applies the delete, acknowledges it, and (knowing east deleted
        // it) purges at once; east purges when it reads west's ack.
        assert_eq!(pull_from(&mut dcs, 1, 0), 1);
        assert_eq!(tombstone_count(&dcs[1].kv, 10).unwrap(), 0);
        assert!(
            matches!(
                feed_since(&dcs[1].kv, 0, 10).unwrap().last(),
                Some((_, FeedRecord::TombstoneAck { .. }))
            ),
            "west acknowledged in its feed"
        );
        assert_eq!(tombstone_count(&dcs[0].kv, 10).unwrap(), 1);
        converge(&mut dcs);
        for dc in &dcs {
            assert_eq!(tombstone_count(&dc.kv, 10).unwrap(), 0);
            assert!(get_message(&dc.kv, &m.id).unwrap().is_none());
            assert!(holders(&dc.kv, &m.id).unwrap().is_empty());
            assert_eq!(complete_ms(&dc.kv, &m.id).unwrap(), None);
        }
        // Nothing left for the message at all: no key mentions its id.
        for dc in &dcs {
            let id = m.id.as_bytes();
            let left: Vec<_> = dc
                .kv
                .0
                .keys()
                .filter(|k| k.windows(16).any(|w| w == id))
                .map(|k| keys::hex(k))
                .collect();
            assert!(left.is_empty(), "{}: {left:?}", dc.ctx.local_dc);
        }
    }

    #[test]
    fn delete_that_overtakes_the_creation_is_kept_until_the_creation_is_seen() {
        let all = ["east", "west", "north"];
        let mut dcs = [
            Dc::in_cluster("east", &all),
            Dc::in_cluster("west", &all),
            Dc::in_cluster("north", &all),
        ];
        let m = put_inline(&mut dcs[0], "/in");
        pull_from(&mut dcs, 1, 0);
        dcs[1]
            .run(Command::DeleteMessage { id: m.id, at_ms: 9 })
            .unwrap();
        // North hears of the delete (from west) before the creation (from east).
        pull_from(&mut dcs, 2, 1);
        let t = tombstone(&dcs[2].kv, &m.id).unwrap().expect("tombstone");
        assert!(!t.seen_creation);
        assert_eq!(
            feed_head(&dcs[2].kv).unwrap(),
            0,
            "north must not acknowledge before it saw the creation"
        );
        // Everyone else acknowledges; north still keeps its tombstone.
        pull_from(&mut dcs, 0, 1);
        pull_from(&mut dcs, 1, 0);
        assert!(tombstone(&dcs[2].kv, &m.id).unwrap().is_some());
        // The creation arrives: it is not stored, north acknowledges.
        pull_from(&mut dcs, 2, 0);
        assert!(get_message(&dcs[2].kv, &m.id).unwrap().is_none());
        assert!(matches!(
            feed_since(&dcs[2].kv, 0, 10).unwrap().last(),
            Some((_, FeedRecord::TombstoneAck { .. }))
        ));
        converge(&mut dcs);
        for dc in &dcs {
            assert!(get_message(&dc.kv, &m.id).unwrap().is_none());
            assert_eq!(
                tombstone_count(&dc.kv, 10).unwrap(),
                0,
                "{}",
                dc.ctx.local_dc
            );
        }
        // Re-pulling every feed from the start after the purge applies
        // nothing (cursors) and brings nothing back.
        converge(&mut dcs);
        for dc in &dcs {
            assert!(list_messages(&dc.kv, &mb("/in"), None, 10)
                .unwrap()
                .is_empty());
        }
    }

    #[test]
    fn concurrent_deletes_in_two_dcs_converge_and_purge() {
        let mut dcs = [Dc::new("east"), Dc::new("west")];
        let m = put_inline(&mut dcs[0], "/in");
        converge(&mut dcs);
        dcs[0]
            .run(Command::DeleteMessage { id: m.id, at_ms: 5 })
            .unwrap();
        dcs[1]
            .run(Command::DeleteMessage { id: m.id, at_ms: 6 })
            .unwrap();
        converge(&mut dcs);
        for dc in &dcs {
            assert!(get_message(&dc.kv, &m.id).unwrap().is_none());
            assert_eq!(tombstone_count(&dc.kv, 10).unwrap(), 0);
        }
    }

    #[test]
    fn attributes_are_last_writer_wins_by_hlc_then_dc() {
        let mut dcs = [Dc::new("east"), Dc::new("west")];
        let m = put_inline(&mut dcs[0], "/in");
        converge(&mut dcs);
        // Concurrent changes while partitioned: same key, same wall clock
        // (the DC name decides: west > east), plus one key each.
        set_attr(&mut dcs[0], m.id, "status", "east-says", 100);
        set_attr(&mut dcs[1], m.id, "status", "west-says", 100);
        set_attr(&mut dcs[0], m.id, "e", "1", 101);
        set_attr(&mut dcs[1], m.id, "w", "1", 99);
        converge(&mut dcs);
        let a = get_message(&dcs[0].kv, &m.id).unwrap().unwrap();
        let b = get_message(&dcs[1].kv, &m.id).unwrap().unwrap();
        assert_eq!(a, b, "both DCs agree");
        assert_eq!(a.attributes["status"], "west-says");
        assert_eq!(a.attributes["e"], "1");
        assert_eq!(a.attributes["w"], "1");
        assert_eq!(a.attributes["from"], "upload");
        // East's clock is behind, but having seen west's write, its next
        // write is stamped after it and wins.
        let after = set_attr(&mut dcs[0], m.id, "status", "east-later", 50);
        assert_eq!(after.attributes["status"], "east-later");
        let reg = &attribute_registers(&dcs[0].kv, &m.id).unwrap()["status"];
        assert_eq!(
            reg.stamp.hlc,
            mailbox_types::Hlc {
                wall_ms: 101,
                logical: 1
            }
        );
        converge(&mut dcs);
        for dc in &dcs {
            let got = get_message(&dc.kv, &m.id).unwrap().unwrap();
            assert_eq!(got.attributes["status"], "east-later");
        }
        // Removal is a write like any other.
        dcs[1]
            .run(Command::SetAttributes {
                id: m.id,
                set: BTreeMap::new(),
                remove: vec!["from".into()],
                wall_ms: 200,
            })
            .unwrap();
        converge(&mut dcs);
        for dc in &dcs {
            let got = get_message(&dc.kv, &m.id).unwrap().unwrap();
            assert!(!got.attributes.contains_key("from"));
        }
        // Unknown message: refused, nothing written.
        assert!(matches!(
            dcs[0].run(Command::SetAttributes {
                id: MessageId::new(),
                set: BTreeMap::new(),
                remove: vec![],
                wall_ms: 1
            }),
            Err(StateError::MessageNotFound { .. })
        ));
    }

    #[test]
    fn attribute_change_that_overtakes_the_creation_is_merged_on_arrival() {
        let all = ["east", "west", "north"];
        let mut dcs = [
            Dc::in_cluster("east", &all),
            Dc::in_cluster("west", &all),
            Dc::in_cluster("north", &all),
        ];
        let m = put_inline(&mut dcs[0], "/in");
        pull_from(&mut dcs, 1, 0);
        set_attr(&mut dcs[1], m.id, "from", "west", 10);
        pull_from(&mut dcs, 2, 1);
        assert!(get_message(&dcs[2].kv, &m.id).unwrap().is_none());
        pull_from(&mut dcs, 2, 0);
        let got = get_message(&dcs[2].kv, &m.id).unwrap().unwrap();
        assert_eq!(got.attributes["from"], "west");
        converge(&mut dcs);
        let metas: Vec<_> = dcs
            .iter()
            .map(|d| get_message(&d.kv, &m.id).unwrap().unwrap())
            .collect();
        assert!(metas.iter().all(|x| x == &metas[0]));
    }

    #[test]
    fn delete_beats_a_concurrent_attribute_change() {
        let mut dcs = [Dc::new("east"), Dc::new("west")];
        let m = put_inline(&mut dcs[0], "/in");
        converge(&mut dcs);
        set_attr(&mut dcs[1], m.id, "k", "v", i64::MAX / 2);
        dcs[0]
            .run(Command::DeleteMessage { id: m.id, at_ms: 1 })
            .unwrap();
        converge(&mut dcs);
        for dc in &dcs {
            assert!(get_message(&dc.kv, &m.id).unwrap().is_none());
            assert!(attribute_registers(&dc.kv, &m.id).unwrap().is_empty());
            assert_eq!(tombstone_count(&dc.kv, 10).unwrap(), 0);
        }
    }
}

/// Inline payloads are (de)serialized as bytes for speed; the encoding must
/// stay what logs and snapshots written before hold.
#[test]
fn inline_payload_encoding_is_unchanged_by_serde_bytes() {
    #[derive(serde::Serialize, serde::Deserialize)]
    struct Plain {
        v: Option<Vec<u8>>,
    }
    #[derive(serde::Serialize, serde::Deserialize)]
    struct AsBytes {
        #[serde(with = "serde_bytes")]
        v: Option<Vec<u8>>,
    }
    for v in [None, Some(vec![]), Some(vec![1u8, 2, 3, 255])] {
        let old = bincode::serialize(&Plain { v: v.clone() }).unwrap();
        assert_eq!(old, bincode::serialize(&AsBytes { v: v.clone() }).unwrap());
        assert_eq!(bincode::deserialize::<AsBytes>(&old).unwrap().v, v);
    }
}
