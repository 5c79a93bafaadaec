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
    // After a delete the key still answers with the original, for the
    // retention; once that expired the key is free again.
    run(&mut kv, Command::DeleteMessage { id: a.id, at_ms: 5 }).unwrap();
    let d = meta("/inbox", "x");
    assert_eq!(
        put(&mut kv, &d, Some("k1")),
        Ok(CommandResult::Message {
            meta: a.clone(),
            deduplicated: true,
        })
    );
    run(&mut kv, Command::Expire { before_ms: 6 }).unwrap();
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
                    identity: String::new(),
                    head: 0,
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
            identity: String::new(),
            head: 0,
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
                identity: String::new(),
                head: 0,
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
                identity: String::new(),
                head: 0,
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
            identity: String::new(),
            head: 0,
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
        // Once the retention expired, nothing is left for the message at
        // all: no key mentions its id.
        for dc in &mut dcs {
            dc.run(Command::Expire { before_ms: 10 }).unwrap();
        }
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

    fn put_keyed(dc: &mut Dc, key: &str) -> (MessageMeta, CommandResult) {
        dc.run(Command::CreateMailbox {
            path: mb("/in"),
            parents: true,
            created_ms: 1,
        })
        .unwrap();
        let mut m = meta("/in", "x");
        m.origin_dc = dc.ctx.local_dc.clone();
        let r = dc
            .run(Command::PutMessage {
                meta: m.clone(),
                inline: Some(b"abc".to_vec()),
                idempotency_key: Some(key.into()),
            })
            .unwrap();
        (m, r)
    }

    fn key_owner(dc: &Dc, key: &str) -> Option<MessageId> {
        let k = keys::idempotency(&mb("/in"), key);
        dc.kv.0.get(&k).map(|v| keys::decode_id(&k, v).unwrap())
    }

    /// Issue #8 item 6: a partner whose upload to east timed out retries
    /// through west; west answers with east's message.
    #[test]
    fn an_idempotency_key_answers_in_every_dc() {
        let mut dcs = [Dc::new("east"), Dc::new("west")];
        let (m, _) = put_keyed(&mut dcs[0], "order-1");
        converge(&mut dcs);
        let (retry, r) = put_keyed(&mut dcs[1], "order-1");
        assert_eq!(
            r,
            CommandResult::Message {
                meta: get_message(&dcs[1].kv, &m.id).unwrap().unwrap(),
                deduplicated: true
            },
            "west must answer with east's message"
        );
        assert!(get_message(&dcs[1].kv, &retry.id).unwrap().is_none());
    }

    fn report(dc: &mut Dc, cursors: &[(&str, u64)]) -> (u64, bool) {
        report_as(dc, "id-1", cursors)
    }

    fn report_as(dc: &mut Dc, identity: &str, cursors: &[(&str, u64)]) -> (u64, bool) {
        match dc
            .run(Command::FeedCursors {
                cursors: cursors
                    .iter()
                    .map(|(d, c)| {
                        let ack = crate::FeedAck {
                            identity: identity.to_string(),
                            cursor: *c,
                        };
                        (d.to_string(), ack)
                    })
                    .collect(),
            })
            .unwrap()
        {
            CommandResult::Trimmed { floor, more } => (floor, more),
            other => panic!("{other:?}"),
        }
    }

    /// Issue #8: feed records every other DC has applied are trimmed, and
    /// only those: a DC that has not reported keeps everything.
    #[test]
    fn the_feed_is_trimmed_only_below_every_dcs_cursor() {
        let names = ["east", "west", "south"];
        let mut dcs = names.map(|n| Dc::in_cluster(n, &names));
        for _ in 0..3 {
            put_inline(&mut dcs[0], "/in");
        }
        let head = feed_head(&dcs[0].kv).unwrap();
        assert!(head >= 4, "a mailbox and three messages");
        pull_from(&mut dcs, 1, 0);
        assert_eq!(
            report(&mut dcs[0], &[("west", head)]),
            (0, false),
            "south has not reported"
        );
        pull_from(&mut dcs, 2, 0);
        assert_eq!(report(&mut dcs[0], &[("south", 2)]), (2, false));
        assert_eq!(
            feed_since(&dcs[0].kv, 0, 100).unwrap()[0].0,
            3,
            "1 and 2 trimmed"
        );
        // A report never moves a cursor back, nor past the head.
        assert_eq!(report(&mut dcs[0], &[("south", 1)]), (2, false));
        assert_eq!(report(&mut dcs[0], &[("south", head + 100)]), (head, false));
        assert!(feed_since(&dcs[0].kv, 0, 100).unwrap().is_empty());
        assert_eq!(feed_head(&dcs[0].kv).unwrap(), head, "the head stays");
        assert_eq!(crate::replication::feed_floor(&dcs[0].kv).unwrap(), head);
        // South rebuilt from empty reports a lower cursor under a new
        // identity: that counts (trimming waits for it again).
        put_inline(&mut dcs[0], "/in");
        assert_eq!(
            report_as(&mut dcs[0], "id-2", &[("south", 1), ("west", head + 2)]),
            (head, false)
        );
        assert_eq!(
            crate::replication::feed_acks(&dcs[0].kv).unwrap()[0]
                .1
                .cursor,
            1,
            "south's known cursor went back with its new identity"
        );
        // A DC's own cursor is not a report.
        let mut east = Dc::in_cluster("east", &names);
        put_inline(&mut east, "/in");
        assert_eq!(report(&mut east, &[("east", 5)]).0, 0);
    }

    impl Dc {
        /// Reads `from`'s state as a resync does, `page` rows a batch.
        fn resync(&mut self, from: &Dc, page: usize) -> u64 {
            let floor = crate::replication::feed_floor(&from.kv).unwrap();
            let mut pos = None;
            let mut batches = 0;
            loop {
                let (records, next) = crate::replication::resync_page(
                    &from.kv,
                    &from.ctx.local_dc,
                    &self.ctx.local_dc,
                    pos.as_deref(),
                    page,
                    usize::MAX,
                )
                .unwrap();
                batches += 1;
                self.run(Command::ApplyResync {
                    origin: from.ctx.local_dc.clone(),
                    identity: String::new(),
                    records,
                    received_ms: 2000,
                    payload_here: vec![],
                    floor,
                    done: next.is_none(),
                })
                .unwrap();
                match next {
                    Some(p) => pos = Some(p),
                    None => return batches,
                }
            }
        }
    }

    /// A DC whose cursor is below a trimmed feed (rebuilt from empty, or
    /// reset) cannot read the records it lacks: a pull is refused with a
    /// gap, never applied past it; a resync from the origin's state gives
    /// it every message, key, attribute register and pending delete, and
    /// the feed then continues after the floor.
    #[test]
    fn a_dc_below_the_trimmed_feed_is_resynced_from_the_state() {
        let mut dcs = [Dc::new("east"), Dc::new("west")];
        let (a, _) = put_keyed(&mut dcs[0], "order-1");
        set_attr(&mut dcs[0], a.id, "status", "new", 50);
        let b = {
            let mut m = segmented("/in");
            m.origin_dc = "east".into();
            dcs[0]
                .run(Command::PutMessage {
                    meta: m.clone(),
                    inline: None,
                    idempotency_key: None,
                })
                .unwrap();
            m
        };
        let c = put_inline(&mut dcs[0], "/in/sub");
        let own = put_inline(&mut dcs[1], "/west-in");
        converge(&mut dcs);
        dcs[0]
            .run(Command::DeleteMessage {
                id: c.id,
                at_ms: 60,
            })
            .unwrap();
        let west_at = cursor(&dcs[1].kv, "east").unwrap();
        report(&mut dcs[0], &[("west", west_at)]);
        assert!(crate::replication::feed_floor(&dcs[0].kv).unwrap() > 0);
        // West is rebuilt from empty.
        let mut west = Dc::new("west");
        let r = west.run(Command::ApplyRemote {
            origin: "east".into(),
            records: feed_since(&dcs[0].kv, 0, 100).unwrap(),
            received_ms: 1000,
            payload_here: vec![],
            identity: String::new(),
            head: 0,
        });
        assert!(
            matches!(r, Err(StateError::FeedGap { .. })),
            "records after the floor are refused, not applied past the gap: {r:?}"
        );
        assert!(west.resync(&dcs[0], 2) > 2, "several pages");
        assert_eq!(
            cursor(&west.kv, "east").unwrap(),
            crate::replication::feed_floor(&dcs[0].kv).unwrap()
        );
        // The feed continues after the floor.
        west.pull(&dcs[0]);
        assert_eq!(
            get_message(&west.kv, &a.id).unwrap(),
            get_message(&dcs[0].kv, &a.id).unwrap()
        );
        assert_eq!(inline_payload(&west.kv, &a.id).unwrap().unwrap(), b"abc");
        assert_eq!(
            attribute_registers(&west.kv, &a.id).unwrap(),
            attribute_registers(&dcs[0].kv, &a.id).unwrap()
        );
        assert_eq!(key_owner(&west, "order-1"), Some(a.id));
        assert_eq!(
            missing_payloads(&west.kv, 10).unwrap(),
            vec![get_message(&dcs[0].kv, &b.id).unwrap().unwrap()]
        );
        assert!(get_message(&west.kv, &c.id).unwrap().is_none());
        assert!(get_mailbox(&west.kv, &mb("/in/sub")).unwrap().is_some());
        // West's own message comes back from east's copy.
        assert_eq!(
            get_message(&west.kv, &own.id).unwrap(),
            get_message(&dcs[0].kv, &own.id).unwrap()
        );
        assert_eq!(inline_payload(&west.kv, &own.id).unwrap().unwrap(), b"abc");
        // West acknowledges the pending delete: the tombstone settles.
        // (East forgets its cursor on the old west's feed, as
        // `replication reset-feed` does after the identity changed.)
        dcs[1] = west;
        dcs[0]
            .run(Command::ResetFeed {
                origin: "west".into(),
            })
            .unwrap();
        converge(&mut dcs);
        for dc in &dcs {
            assert_eq!(
                tombstone_count(&dc.kv, 10).unwrap(),
                0,
                "{}",
                dc.ctx.local_dc
            );
        }
        // A resync overtaken by the feed is stale and changes nothing.
        let before = dcs[1].kv.clone();
        let (records, _) =
            crate::replication::resync_page(&dcs[0].kv, "east", "west", None, 100, usize::MAX)
                .unwrap();
        dcs[1]
            .run(Command::ApplyResync {
                origin: "east".into(),
                identity: String::new(),
                records,
                received_ms: 3000,
                payload_here: vec![],
                floor: 1,
                done: true,
            })
            .unwrap();
        assert_eq!(dcs[1].kv.0, before.0);
    }

    /// The same file with the same key uploaded into two DCs while they
    /// could not see each other (a retry into the other DC during a
    /// partition): every DC keeps the older message and removes the newer.
    #[test]
    fn a_key_used_in_two_dcs_at_once_settles_on_one_message_everywhere() {
        let mut dcs = [Dc::new("east"), Dc::new("west")];
        let (a, _) = put_keyed(&mut dcs[0], "k");
        let (b, _) = put_keyed(&mut dcs[1], "k");
        assert!(a.id < b.id);
        converge(&mut dcs);
        for dc in &dcs {
            let name = &dc.ctx.local_dc;
            assert_eq!(key_owner(dc, "k"), Some(a.id), "{name}");
            assert!(get_message(&dc.kv, &a.id).unwrap().is_some(), "{name}");
            assert!(get_message(&dc.kv, &b.id).unwrap().is_none(), "{name}");
            assert_eq!(tombstone_count(&dc.kv, 10).unwrap(), 0, "{name}");
        }
        // A replay of the removed upload is still the same success.
        match dcs[1]
            .run(Command::PutMessage {
                meta: b.clone(),
                inline: Some(b"abc".to_vec()),
                idempotency_key: Some("k".into()),
            })
            .unwrap()
        {
            CommandResult::Message {
                meta,
                deduplicated: false,
            } => assert_eq!(meta.id, b.id),
            other => panic!("{other:?}"),
        }
        assert!(get_message(&dcs[1].kv, &b.id).unwrap().is_none());
    }

    /// The twin is removed only where the older copy is held: until west
    /// has fetched east's segments, west's own copy is its only one.
    #[test]
    fn a_twin_stays_until_the_older_copy_is_held_here() {
        let mut dcs = [Dc::new("east"), Dc::new("west")];
        let mut put_seg = |i: usize, dc: &str| {
            dcs[i]
                .run(Command::CreateMailbox {
                    path: mb("/in"),
                    parents: true,
                    created_ms: 1,
                })
                .unwrap();
            let mut m = segmented("/in");
            m.origin_dc = dc.into();
            dcs[i]
                .run(Command::PutMessage {
                    meta: m.clone(),
                    inline: None,
                    idempotency_key: Some("k".into()),
                })
                .unwrap();
            m
        };
        let a = put_seg(0, "east");
        let b = put_seg(1, "west");
        assert!(a.id < b.id);
        converge(&mut dcs);
        // East holds a: b went there at once. West does not hold a yet.
        assert!(get_message(&dcs[0].kv, &b.id).unwrap().is_none());
        assert!(
            get_message(&dcs[1].kv, &b.id).unwrap().is_some(),
            "west's only copy of the file must stay until it holds east's"
        );
        dcs[1]
            .run(Command::PayloadHeld {
                id: a.id,
                at_ms: 50,
            })
            .unwrap();
        converge(&mut dcs);
        for dc in &dcs {
            assert!(get_message(&dc.kv, &b.id).unwrap().is_none());
            assert!(get_message(&dc.kv, &a.id).unwrap().is_some());
            assert_eq!(key_owner(dc, "k"), Some(a.id));
            assert_eq!(tombstone_count(&dc.kv, 10).unwrap(), 0);
        }
    }

    /// Different payloads under one key (a client reusing keys) are two
    /// files: both stay, the key answers with the older in every DC.
    #[test]
    fn one_key_for_two_different_files_keeps_both() {
        let mut dcs = [Dc::new("east"), Dc::new("west")];
        let (a, _) = put_keyed(&mut dcs[0], "k");
        dcs[1]
            .run(Command::CreateMailbox {
                path: mb("/in"),
                parents: true,
                created_ms: 1,
            })
            .unwrap();
        let mut b = meta("/in", "other");
        b.origin_dc = "west".into();
        b.size = 4;
        b.sha256 = Digest::of(b"abcd");
        dcs[1]
            .run(Command::PutMessage {
                meta: b.clone(),
                inline: Some(b"abcd".to_vec()),
                idempotency_key: Some("k".into()),
            })
            .unwrap();
        converge(&mut dcs);
        for dc in &dcs {
            assert_eq!(key_owner(dc, "k"), Some(a.id));
            assert!(get_message(&dc.kv, &b.id).unwrap().is_some());
        }
    }

    /// A key keeps answering after its message was deleted, for the
    /// retention; `Expire` then frees it (and forgets the replay guard).
    #[test]
    fn a_key_outlives_the_delete_until_it_expires() {
        let mut dcs = [Dc::new("east"), Dc::new("west")];
        let (m, _) = put_keyed(&mut dcs[0], "k");
        converge(&mut dcs);
        dcs[0]
            .run(Command::DeleteMessage {
                id: m.id,
                at_ms: 100,
            })
            .unwrap();
        converge(&mut dcs);
        for dc in &mut dcs {
            let (again, r) = put_keyed(dc, "k");
            match r {
                CommandResult::Message {
                    meta,
                    deduplicated: true,
                } => assert_eq!(meta.id, m.id),
                other => panic!("key must answer after the delete: {other:?}"),
            }
            assert!(get_message(&dc.kv, &again.id).unwrap().is_none());
            assert!(get_message(&dc.kv, &m.id).unwrap().is_none());
        }
        // Not yet due: nothing expires.
        assert!(matches!(
            dcs[0].run(Command::Expire { before_ms: 100 }).unwrap(),
            CommandResult::Expired { count: 0, .. }
        ));
        for dc in &mut dcs {
            dc.run(Command::Expire { before_ms: 101 }).unwrap();
            // Nothing left for the message at all.
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
        let (fresh, r) = put_keyed(&mut dcs[1], "k");
        assert_eq!(
            r,
            CommandResult::Message {
                meta: fresh,
                deduplicated: false
            }
        );
    }

    /// Issue #8 item 7: a DC that joins after a tombstone was purged reads
    /// the old feeds and acknowledges the delete; the others must not start
    /// a tombstone that never settles.
    #[test]
    fn a_late_acknowledgement_after_the_purge_leaves_no_tombstone() {
        let mut dcs = [Dc::new("east"), Dc::new("west")];
        let m = put_inline(&mut dcs[0], "/in");
        converge(&mut dcs);
        dcs[0]
            .run(Command::DeleteMessage { id: m.id, at_ms: 9 })
            .unwrap();
        converge(&mut dcs);
        let all = ["east", "west", "north"];
        for dc in &mut dcs {
            dc.run(Command::SetClusterDcs {
                dcs: all.iter().map(|d| d.to_string()).collect(),
            })
            .unwrap();
        }
        let mut all_dcs = [
            Dc {
                kv: dcs[0].kv.clone(),
                ctx: dcs[0].ctx.clone(),
            },
            Dc {
                kv: dcs[1].kv.clone(),
                ctx: dcs[1].ctx.clone(),
            },
            Dc::in_cluster("north", &all),
        ];
        converge(&mut all_dcs);
        for dc in &all_dcs {
            assert_eq!(
                tombstone_count(&dc.kv, 10).unwrap(),
                0,
                "{}",
                dc.ctx.local_dc
            );
            assert!(get_message(&dc.kv, &m.id).unwrap().is_none());
        }
    }

    /// Issue #8 item 5: a remote DC rebuilt from empty has a new feed
    /// identity; its records are refused until an admin resets the cursor.
    #[test]
    fn a_feed_with_another_identity_is_refused_until_reset() {
        let mut east = Dc::new("east");
        let mut west = Dc::new("west");
        east.run(Command::InitFeedIdentity {
            identity: "feed-1".into(),
        })
        .unwrap();
        put_inline(&mut east, "/in");
        let apply = |west: &mut Dc, identity: &str, records| {
            west.run(Command::ApplyRemote {
                origin: "east".into(),
                records,
                received_ms: 1,
                payload_here: vec![],
                identity: identity.into(),
                head: 0,
            })
        };
        let recs = feed_since(&east.kv, 0, 100).unwrap();
        assert!(apply(&mut west, "feed-1", recs.clone()).is_ok());
        assert_eq!(cursor(&west.kv, "east").unwrap(), 2);
        // East is rebuilt: a new log, a new identity, its feed from 1 again.
        let mut rebuilt = Dc::new("east");
        rebuilt
            .run(Command::InitFeedIdentity {
                identity: "feed-2".into(),
            })
            .unwrap();
        // A second init never changes the identity.
        rebuilt
            .run(Command::InitFeedIdentity {
                identity: "feed-3".into(),
            })
            .unwrap();
        assert_eq!(
            crate::feed_identity(&rebuilt.kv).unwrap().as_deref(),
            Some("feed-2")
        );
        let m2 = put_inline(&mut rebuilt, "/in");
        let recs = feed_since(&rebuilt.kv, 0, 100).unwrap();
        assert!(matches!(
            apply(&mut west, "feed-2", recs.clone()),
            Err(StateError::FeedIdentityChanged { .. })
        ));
        west.run(Command::ResetFeed {
            origin: "east".into(),
        })
        .unwrap();
        assert!(apply(&mut west, "feed-2", recs).is_ok());
        assert!(get_message(&west.kv, &m2.id).unwrap().is_some());
    }

    /// Issue #8 item 2: the collector's decision goes through the log; an
    /// upload committed after it is refused, one committed before it is
    /// skipped by it.
    #[test]
    fn condemned_segments_are_never_committed_and_committed_ones_never_condemned() {
        let mut east = Dc::new("east");
        east.run(Command::CreateMailbox {
            path: mb("/in"),
            parents: false,
            created_ms: 1,
        })
        .unwrap();
        let stalled = segmented("/in");
        let committed = segmented("/in");
        east.run(Command::PutMessage {
            meta: committed.clone(),
            inline: None,
            idempotency_key: None,
        })
        .unwrap();
        match east
            .run(Command::CondemnOrphans {
                ids: vec![stalled.id, committed.id],
                at_ms: 50,
            })
            .unwrap()
        {
            CommandResult::Condemned { ids } => assert_eq!(ids, vec![stalled.id]),
            other => panic!("{other:?}"),
        }
        assert!(crate::orphan_pending(&east.kv, &stalled.id).unwrap());
        assert!(matches!(
            east.run(Command::PutMessage {
                meta: stalled.clone(),
                inline: None,
                idempotency_key: None,
            }),
            Err(StateError::SegmentsCollected { .. })
        ));
        east.run(Command::OrphansCollected {
            ids: vec![stalled.id],
        })
        .unwrap();
        assert!(!crate::orphan_pending(&east.kv, &stalled.id).unwrap());
        // Still refused after the removal, until the decision expires.
        assert!(east
            .run(Command::PutMessage {
                meta: stalled.clone(),
                inline: None,
                idempotency_key: None,
            })
            .is_err());
        east.run(Command::Expire { before_ms: 51 }).unwrap();
        assert!(crate::get_message(&east.kv, &stalled.id).unwrap().is_none());
    }

    /// A pushed payload the collector condemned while its record was late
    /// is not counted held on the record's arrival: it is fetched again.
    #[test]
    fn a_condemned_pushed_payload_is_fetched_not_trusted() {
        let mut east = Dc::new("east");
        let mut west = Dc::new("west");
        let m = put_segmented(&mut east);
        west.run(Command::CondemnOrphans {
            ids: vec![m.id],
            at_ms: 1,
        })
        .unwrap();
        west.run(Command::ApplyRemote {
            origin: "east".into(),
            records: feed_since(&east.kv, 0, 100).unwrap(),
            received_ms: 2,
            payload_here: vec![m.id],
            identity: String::new(),
            head: 0,
        })
        .unwrap();
        assert!(holders(&west.kv, &m.id)
            .unwrap()
            .iter()
            .all(|(dc, _)| dc != "west"));
        assert_eq!(missing_payloads(&west.kv, 10).unwrap().len(), 1);
    }

    /// Issue #8 item 7: reads during apply see the batch's pending writes,
    /// so one log entry with many commands ends where one entry per command
    /// does.
    #[test]
    fn results_do_not_depend_on_batch_boundaries() {
        let all = ["east", "west", "north"];
        let mut east = Dc::in_cluster("east", &all);
        let mut west = Dc::in_cluster("west", &all);
        let m = put_inline(&mut east, "/in");
        west.pull(&east);
        west.run(Command::DeleteMessage { id: m.id, at_ms: 3 })
            .unwrap();
        let cmds = vec![
            Command::ApplyRemote {
                origin: "west".into(),
                records: feed_since(&west.kv, 0, 100).unwrap(),
                received_ms: 5,
                payload_here: vec![],
                identity: String::new(),
                head: 0,
            },
            // North leaves the cluster: the purge scan must see the
            // tombstone (acknowledged by east and west, waiting for north)
            // that the first command wrote in this very batch.
            Command::SetClusterDcs {
                dcs: vec!["east".into(), "west".into()],
            },
        ];
        let mut one_by_one = Dc {
            kv: east.kv.clone(),
            ctx: east.ctx.clone(),
        };
        for c in cmds.clone() {
            one_by_one.run(c).unwrap();
        }
        east.run(Command::Batch(cmds)).unwrap();
        assert_eq!(east.kv.0, one_by_one.kv.0);
        assert_eq!(tombstone_count(&east.kv, 10).unwrap(), 0);
    }

    /// The overlay remembers what it read from the base for the rest of
    /// its batch: no key is read from the base twice in one batch (every
    /// command of a batch read its mailbox and the DC list again), and
    /// the batch still ends where one command per batch does, with
    /// replays, duplicates, deletes and refusals among its commands.
    #[test]
    fn a_batch_reads_each_key_from_the_base_once_and_ends_as_one_by_one() {
        struct Counting<'a> {
            kv: &'a MemKv,
            gets: std::cell::RefCell<BTreeMap<Vec<u8>, usize>>,
        }
        impl KvRead for Counting<'_> {
            fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StateError> {
                *self.gets.borrow_mut().entry(key.to_vec()).or_default() += 1;
                self.kv.get(key)
            }
            fn scan(
                &self,
                prefix: &[u8],
                after: Option<&[u8]>,
                limit: usize,
            ) -> Result<KvPairs, StateError> {
                self.kv.scan(prefix, after, limit)
            }
        }
        let mut east = Dc::in_cluster("east", &["east", "west"]);
        let first = put_inline(&mut east, "/in");
        let mut cmds = Vec::new();
        let mut metas = Vec::new();
        for i in 0..20 {
            let mut m = meta("/in", &format!("f{i}"));
            m.origin_dc = "east".into();
            metas.push(m.clone());
            cmds.push(Command::PutMessage {
                meta: m,
                inline: Some(b"abc".to_vec()),
                // Every fifth shares a key with the one before: deduplicated.
                idempotency_key: Some(format!("k{}", i - usize::from(i % 5 == 4))),
            });
        }
        cmds.push(Command::DeleteMessage {
            id: metas[3].id,
            at_ms: 9,
        });
        // Refused: no such mailbox (rolled back, nothing written).
        cmds.push(Command::PutMessage {
            meta: meta("/nope", "x"),
            inline: Some(b"abc".to_vec()),
            idempotency_key: None,
        });
        // A replay of a message committed in an earlier batch, and of one
        // committed earlier in this batch.
        for m in [&first, &metas[0]] {
            cmds.push(Command::PutMessage {
                meta: m.clone(),
                inline: Some(b"abc".to_vec()),
                idempotency_key: None,
            });
        }
        let mut one_by_one = Dc {
            kv: east.kv.clone(),
            ctx: east.ctx.clone(),
        };
        let expected: Vec<_> = cmds.iter().map(|c| one_by_one.run(c.clone())).collect();
        let counting = Counting {
            kv: &east.kv,
            gets: Default::default(),
        };
        let mut ov = Overlay::new();
        let got = apply(&counting, &mut ov, &east.ctx, &Command::Batch(cmds));
        let twice: Vec<_> = counting
            .gets
            .borrow()
            .iter()
            .filter(|(_, n)| **n > 1)
            .map(|(k, n)| (keys::hex(k), *n))
            .collect();
        assert!(
            twice.is_empty(),
            "read from the base more than once: {twice:?}"
        );
        let Ok(CommandResult::Batch(got)) = got else {
            panic!("batch refused: {got:?}")
        };
        assert_eq!(format!("{got:?}"), format!("{expected:?}"));
        east.kv.commit(ov);
        assert_eq!(east.kv.0, one_by_one.kv.0);
    }

    /// Issue #8: the feed kept a second copy of every inline payload (the
    /// snapshot of a DC with 1.6 GB inline was 3.4 GB). The stored feed
    /// record has no payload; the record as sent has it, read from the
    /// message.
    #[test]
    fn the_feed_keeps_no_second_copy_of_inline_payloads() {
        let (mut east, mut west) = (Dc::new("east"), Dc::new("west"));
        east.run(Command::CreateMailbox {
            path: mb("/in"),
            parents: true,
            created_ms: 1,
        })
        .unwrap();
        let data = vec![7u8; 60 << 10];
        let mut m = meta("/in", "big-inline");
        m.size = data.len() as u64;
        m.sha256 = Digest::of(&data);
        east.run(Command::PutMessage {
            meta: m.clone(),
            inline: Some(data.clone()),
            idempotency_key: None,
        })
        .unwrap();
        let stored: usize = east.kv.0.values().map(|v| v.len()).sum();
        assert!(
            stored < data.len() + 4096,
            "{stored} bytes of state for a {} byte payload",
            data.len()
        );
        let sent = feed_since(&east.kv, 0, 10).unwrap();
        assert!(sent.iter().any(|(_, r)| matches!(r,
            FeedRecord::Message { meta, inline: Some(b), .. } if meta.id == m.id && *b == data)));
        west.pull(&east);
        assert_eq!(inline_payload(&west.kv, &m.id).unwrap().unwrap(), data);
    }

    /// An inline message deleted before another DC read its record goes
    /// as `Withdrawn`: never listed there, its delete acknowledged (the
    /// tombstone settles everywhere) and its key still answering there.
    #[test]
    fn an_inline_message_deleted_before_it_was_read_is_withdrawn_not_lost_track_of() {
        let mut dcs = [Dc::new("east"), Dc::new("west")];
        let (m, _) = put_keyed(&mut dcs[0], "order-7");
        dcs[0]
            .run(Command::DeleteMessage { id: m.id, at_ms: 9 })
            .unwrap();
        let sent = feed_since(&dcs[0].kv, 0, 10).unwrap();
        assert!(sent
            .iter()
            .any(|(_, r)| matches!(r, FeedRecord::Withdrawn { meta, .. } if meta.id == m.id)));
        converge(&mut dcs);
        for dc in &dcs {
            let name = &dc.ctx.local_dc;
            assert!(get_message(&dc.kv, &m.id).unwrap().is_none(), "{name}");
            assert_eq!(tombstone_count(&dc.kv, 10).unwrap(), 0, "{name}: settled");
        }
        let (retry, r) = put_keyed(&mut dcs[1], "order-7");
        assert!(
            matches!(r, CommandResult::Message { meta, deduplicated: true } if meta.id == m.id),
            "west answers the retry with east's deleted message"
        );
        assert!(get_message(&dcs[1].kv, &retry.id).unwrap().is_none());
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

// Issue #8, items 1 and 3: a follower's forward retried after the leader
// committed (its reply lost) applies the same `PutMessage` twice.
fn single_dc_with_inbox() -> MemKv {
    let mut kv = MemKv::default();
    create(&mut kv, "/inbox", false).unwrap();
    run(
        &mut kv,
        Command::SetClusterDcs {
            dcs: vec!["east".into()],
        },
    )
    .unwrap();
    kv
}

#[test]
fn a_replayed_put_with_a_key_is_the_same_success_not_a_duplicate_of_itself() {
    let mut kv = single_dc_with_inbox();
    let m = meta("/inbox", "x");
    let first = put(&mut kv, &m, Some("k")).unwrap();
    let head = crate::replication::feed_head(&kv).unwrap();
    let again = put(&mut kv, &m, Some("k")).unwrap();
    assert_eq!(
        first, again,
        "the replay must answer as the first apply did"
    );
    assert_eq!(
        again,
        CommandResult::Message {
            meta: m.clone(),
            deduplicated: false
        }
    );
    assert_eq!(
        crate::replication::feed_head(&kv).unwrap(),
        head,
        "a replay appends nothing to the feed"
    );
}

#[test]
fn a_replayed_put_after_an_attribute_change_is_the_same_success() {
    let mut kv = single_dc_with_inbox();
    let m = meta("/inbox", "x");
    put(&mut kv, &m, None).unwrap();
    run(
        &mut kv,
        Command::SetAttributes {
            id: m.id,
            set: BTreeMap::from([("state".to_string(), "seen".to_string())]),
            remove: vec![],
            wall_ms: 10,
        },
    )
    .unwrap();
    match put(&mut kv, &m, None) {
        Ok(CommandResult::Message {
            meta: stored,
            deduplicated: false,
        }) => {
            assert_eq!(stored.id, m.id);
            assert_eq!(
                stored.attributes.get("state").map(String::as_str),
                Some("seen")
            );
        }
        other => {
            panic!("a replay after an attribute change must be the same success, got {other:?}")
        }
    }
}

#[test]
fn a_replayed_put_after_a_delete_does_not_bring_the_message_back() {
    let mut kv = single_dc_with_inbox();
    let m = meta("/inbox", "x");
    put(&mut kv, &m, Some("k")).unwrap();
    run(&mut kv, Command::DeleteMessage { id: m.id, at_ms: 5 }).unwrap();
    // In a single-DC cluster the tombstone is purged at once.
    let head = crate::replication::feed_head(&kv).unwrap();
    let r = put(&mut kv, &m, Some("k"));
    assert!(
        matches!(
            r,
            Ok(CommandResult::Message {
                deduplicated: false,
                ..
            })
        ),
        "a replay is the same success: {r:?}"
    );
    assert!(
        get_message(&kv, &m.id).unwrap().is_none(),
        "deleted message came back"
    );
    assert!(list_messages(&kv, &mb("/inbox"), None, 10)
        .unwrap()
        .is_empty());
    assert_eq!(crate::replication::feed_head(&kv).unwrap(), head);
}

/// bincode numbers enum variants by position: stored feed records, log
/// entries and replies written by an earlier version must decode as what
/// they were. New variants go last; this pins the numbers of the old ones.
#[test]
fn variant_numbers_of_stored_and_replicated_enums_are_stable() {
    fn tag<T: serde::Serialize>(v: &T) -> u32 {
        let b = bincode::serialize(v).unwrap();
        u32::from_le_bytes(b[..4].try_into().unwrap())
    }
    let id = MessageId::new();
    let m = meta("/in", "x");
    let feed = [
        (
            FeedRecord::Mailbox {
                record: mailbox_types::MailboxRecord {
                    path: mb("/in"),
                    created_ms: 1,
                },
            },
            0,
        ),
        (
            FeedRecord::Message {
                meta: m.clone(),
                inline: None,
                idempotency_key: None,
            },
            1,
        ),
        (FeedRecord::Deleted { id, at_ms: 1 }, 2),
        (
            FeedRecord::Held {
                id,
                dc: "e".into(),
                at_ms: 1,
            },
            3,
        ),
        (
            FeedRecord::Attributes {
                id,
                changes: BTreeMap::new(),
                stamp: Default::default(),
            },
            4,
        ),
        (
            FeedRecord::TombstoneAck {
                id,
                dc: "e".into(),
                at_ms: 1,
            },
            5,
        ),
        (
            FeedRecord::Withdrawn {
                meta: m.clone(),
                idempotency_key: None,
                settled: false,
            },
            6,
        ),
    ];
    for (rec, n) in &feed {
        assert_eq!(tag(rec), *n, "{rec:?}");
    }
    let cmds = [
        (Command::DeleteMessage { id, at_ms: 1 }, 2),
        (Command::PayloadHeld { id, at_ms: 1 }, 4),
        (Command::Batch(vec![]), 6),
        (Command::Expire { before_ms: 1 }, 10),
        (Command::ResetFeed { origin: "w".into() }, 12),
        (
            Command::FeedCursors {
                cursors: BTreeMap::new(),
            },
            13,
        ),
    ];
    for (c, n) in &cmds {
        assert_eq!(tag(c), *n, "{c:?}");
    }
    assert_eq!(
        tag(&CommandResult::Remote {
            applied: 0,
            cursor: 0
        }),
        8
    );
    assert_eq!(
        tag(&CommandResult::Trimmed {
            floor: 0,
            more: false
        }),
        9
    );
}
