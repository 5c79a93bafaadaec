//! Event rules and events in the state machine: raised exactly once, only
//! when every DC holds the message; leases, answers, backoff within its
//! bounds, dead-lettering, replay and per-mailbox order.

use std::collections::BTreeMap;

use mailbox_types::{
    AttemptOutcome, Digest, EventId, EventOrdering, EventRule, EventStatus, MailboxPath, MessageId,
    MessageMeta, Payload, RetryPolicy,
};

use super::*;
use crate::replication::{feed_since, ApplyCtx};
use crate::{apply, Command, CommandResponse, CommandResult, MemKv, Overlay, StateError};

struct Dc {
    kv: MemKv,
    ctx: ApplyCtx,
    requests: u64,
}

impl Dc {
    fn new(name: &str, dcs: &[&str]) -> Self {
        let mut dc = Dc {
            kv: MemKv::default(),
            ctx: ApplyCtx::new(name),
            requests: 0,
        };
        dc.run(Command::SetClusterDcs {
            dcs: dcs.iter().map(|d| d.to_string()).collect(),
        })
        .unwrap();
        for p in ["/in", "/in/sub", "/other"] {
            dc.run(Command::CreateMailbox {
                path: mb(p),
                parents: true,
                created_ms: 1,
            })
            .unwrap();
        }
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

    /// The leader's housekeeping heartbeat up to `to_ms` (an expiry every
    /// 10 s): a DC that is up, though idle, shows no outage.
    fn tick_to(&mut self, to_ms: i64) {
        let mut at = last_activity(&self.kv);
        while at < to_ms {
            at = (at + 10_000).min(to_ms);
            self.run(Command::ExpireLeases {
                now_ms: at,
                seed: at as u64,
            })
            .unwrap();
        }
    }

    fn pull(&mut self, from: &Dc) -> u64 {
        self.pull_some(from, 1000)
    }

    /// Applies at most `max` records of `from`'s feed (an empty pull is a
    /// keep-alive), with `from`'s head as a real feed reports it.
    fn pull_some(&mut self, from: &Dc, max: usize) -> u64 {
        // Received after whatever this DC did last (what a real pull's
        // clock says).
        let received_ms = 1000.max(last_activity(&self.kv) + 1);
        self.pull_at(from, max, received_ms)
    }

    fn pull_at(&mut self, from: &Dc, max: usize, received_ms: i64) -> u64 {
        let since = crate::replication::cursor(&self.kv, &from.ctx.local_dc).unwrap();
        let records = feed_since(&from.kv, since, max).unwrap();
        match self
            .run(Command::ApplyRemote {
                origin: from.ctx.local_dc.clone(),
                records,
                received_ms,
                payload_here: vec![],
                identity: String::new(),
                head: crate::replication::feed_head(&from.kv).unwrap(),
            })
            .unwrap()
        {
            CommandResult::Remote { applied, .. } => applied,
            other => panic!("{other:?}"),
        }
    }

    fn put(&mut self, mailbox: &str, name: &str, at_ms: i64) -> MessageMeta {
        let m = MessageMeta {
            id: MessageId::new(),
            mailbox: mb(mailbox),
            name: name.into(),
            size: 3,
            sha256: Digest::of(b"abc"),
            created_ms: at_ms,
            origin_dc: self.ctx.local_dc.clone(),
            attributes: BTreeMap::new(),
            payload: Payload::Inline,
        };
        self.put_meta(&m).unwrap();
        m
    }

    fn put_meta(&mut self, m: &MessageMeta) -> CommandResponse {
        self.run(Command::PutMessage {
            meta: m.clone(),
            inline: Some(b"abc".to_vec()),
            idempotency_key: None,
        })
    }

    fn rule(&mut self, rule: EventRule, wall_ms: i64) {
        self.run(Command::PutRule { rule, wall_ms }).unwrap();
    }

    fn lease(&mut self, queue: &str, consumer: &str, max: u32, now_ms: i64) -> Vec<Event> {
        self.requests += 1;
        let request = self.requests;
        self.lease_as(queue, consumer, max, now_ms, request)
    }

    fn lease_as(
        &mut self,
        queue: &str,
        consumer: &str,
        max: u32,
        now_ms: i64,
        request: u64,
    ) -> Vec<Event> {
        match self
            .run(Command::LeaseEvents {
                queue: queue.into(),
                consumer: consumer.into(),
                max,
                lease_ms: None,
                now_ms,
                seed: now_ms as u64 ^ 0x5eed,
                request,
            })
            .unwrap()
        {
            CommandResult::Leased { events } => events,
            other => panic!("{other:?}"),
        }
    }

    fn ack(&mut self, ev: &Event, ack: EventAck, now_ms: i64) -> CommandResponse {
        self.run(Command::AckEvent {
            id: ev.id,
            attempt: ev.deliveries,
            consumer: "c1".into(),
            ack,
            now_ms,
            seed: now_ms as u64,
        })
    }

    /// Runs the paged completion re-check to its end, as the leader does.
    fn recheck(&mut self) {
        loop {
            match self.run(Command::RecheckCompletion { now_ms: 1 }).unwrap() {
                CommandResult::Expired { more: true, .. } => {}
                _ => return,
            }
        }
    }

    fn event(&self, id: &EventId) -> Event {
        get_event(&self.kv, id).unwrap().unwrap()
    }
}

fn mb(p: &str) -> MailboxPath {
    MailboxPath::parse(p).unwrap()
}

fn rule(name: &str, mailbox: &str, queue: &str) -> EventRule {
    let mut r = EventRule::new(name, mb(mailbox), queue);
    r.retry = RetryPolicy {
        max_attempts: 3,
        initial_backoff_ms: 100,
        max_backoff_ms: 1_000,
        lease_ms: 1_000,
    };
    r
}

#[test]
fn one_event_per_matching_rule_raised_once_at_completion() {
    let mut east = Dc::new("east", &["east"]);
    east.rule(rule("all", "/in", "q"), 10);
    let mut csv = rule("csv", "/in", "q2");
    csv.include = vec!["*.csv".into()];
    csv.subtree = true;
    east.rule(csv, 11);
    let mut off = rule("off", "/in", "q");
    off.enabled = false;
    east.rule(off, 12);

    let a = east.put("/in", "a.csv", 100);
    let b = east.put("/in/sub", "b.txt", 101);
    let c = east.put("/in/sub", "c.csv", 102);
    let names = |m: &MessageMeta| -> Vec<String> {
        events_of_message(&east.kv, &m.id)
            .unwrap()
            .into_iter()
            .map(|e| e.rule)
            .collect()
    };
    let mut got = names(&a);
    got.sort();
    assert_eq!(got, ["all", "csv"]);
    assert!(names(&b).is_empty(), "not in /in, not *.csv");
    assert_eq!(names(&c), ["csv"]);

    // A replayed proposal (a forward retried) raises nothing more.
    east.put_meta(&a).unwrap();
    assert_eq!(events_of_message(&east.kv, &a.id).unwrap().len(), 2);
    let counts: BTreeMap<_, _> = queue_counts(&east.kv).unwrap().into_iter().collect();
    assert_eq!(counts["q"].raised, 1);
    assert_eq!(counts["q"].pending, 1);
    assert_eq!(counts["q2"].raised, 2);
    let ev = &events_of_message(&east.kv, &a.id).unwrap()[0];
    assert_eq!(ev.id, EventId::for_message(&a.id, &ev.rule));
    assert_eq!(ev.message.sha256, a.sha256);
    assert_eq!(ev.status, EventStatus::Pending);
}

#[test]
fn nothing_is_raised_before_every_dc_holds_the_message_and_only_at_the_origin() {
    let mut east = Dc::new("east", &["east", "west"]);
    let mut west = Dc::new("west", &["east", "west"]);
    east.rule(rule("all", "/in", "q"), 10);
    // The rule replicates: west learns it through east's feed.
    west.pull(&east);
    assert_eq!(list_rules(&west.kv).unwrap().len(), 1);
    let m = east.put("/in", "x", 100);
    assert!(events_of_message(&east.kv, &m.id).unwrap().is_empty());
    assert!(east.lease("q", "c", 10, 5_000).is_empty());
    west.pull(&east); // west holds it now and says so in its feed
    assert!(events_of_message(&east.kv, &m.id).unwrap().is_empty());
    east.pull(&west);
    let evs = events_of_message(&east.kv, &m.id).unwrap();
    assert_eq!(evs.len(), 1);
    assert_eq!(evs[0].complete_ms, 1000, "the latest of the holders' times");
    // Pulling again: still one, raised by east only; west holds a copy
    // of the same event (replicated), not one of its own.
    east.pull(&west);
    west.pull(&east);
    assert_eq!(events_of_message(&east.kv, &m.id).unwrap().len(), 1);
    assert_eq!(
        events_of_message(&west.kv, &m.id).unwrap(),
        events_of_message(&east.kv, &m.id).unwrap()
    );
    let counts: BTreeMap<_, _> = queue_counts(&west.kv).unwrap().into_iter().collect();
    assert_eq!(counts["q"].raised, 0, "west raised nothing");
    assert_eq!(counts["q"].pending, 1);
}

#[test]
fn rules_converge_last_writer_wins_and_deletes_stay_deleted() {
    let mut east = Dc::new("east", &["east", "west"]);
    let mut west = Dc::new("west", &["east", "west"]);
    let mut r1 = rule("r", "/in", "from-east");
    east.rule(r1.clone(), 100);
    let r2 = rule("r", "/in", "from-west");
    west.rule(r2, 200);
    east.pull(&west);
    west.pull(&east);
    for dc in [&east, &west] {
        assert_eq!(get_rule(&dc.kv, "r").unwrap().unwrap().queue, "from-west");
    }
    // A delete in east (stamped above everything east has seen) wins, and a
    // late copy of an older write does not bring the rule back.
    east.run(Command::DeleteRule {
        name: "r".into(),
        wall_ms: 150,
    })
    .unwrap();
    west.pull(&east);
    for dc in [&east, &west] {
        assert!(get_rule(&dc.kv, "r").unwrap().is_none());
    }
    r1.queue = "stale".into();
    let old = Stamp::new(mailbox_types::Hlc::at(50), "east");
    let mut ov = Overlay::new();
    set_rule_remote(&west.kv, &mut ov, "r", Some(&r1), &old).unwrap();
    west.kv.commit(ov);
    assert!(get_rule(&west.kv, "r").unwrap().is_none());
    // Deleting again is the same success; a rule that never was is not found.
    assert!(east
        .run(Command::DeleteRule {
            name: "r".into(),
            wall_ms: 300
        })
        .is_ok());
    assert!(matches!(
        east.run(Command::DeleteRule {
            name: "never".into(),
            wall_ms: 300
        }),
        Err(StateError::RuleNotFound { .. })
    ));
    // A bad rule is refused by the state machine too.
    let mut bad = rule("bad", "/in", "q");
    bad.include = vec!["[oops".into()];
    assert!(matches!(
        east.run(Command::PutRule {
            rule: bad,
            wall_ms: 1
        }),
        Err(StateError::Invalid { .. })
    ));
}

#[test]
fn a_lease_goes_to_one_consumer_and_complete_ends_it() {
    let mut east = Dc::new("east", &["east"]);
    east.rule(rule("all", "/in", "q"), 10);
    east.put("/in", "x", 100);
    let got = east.lease("q", "c1", 10, 1_000);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].deliveries, 1);
    assert_eq!(got[0].status, EventStatus::Processing);
    assert!(
        east.lease("q", "c2", 10, 1_001).is_empty(),
        "leased already"
    );
    let done = east.ack(&got[0], EventAck::Complete, 1_500).unwrap();
    let CommandResult::EventUpdated { event } = done else {
        panic!()
    };
    assert_eq!(event.status, EventStatus::Complete);
    assert_eq!(event.failures, 0);
    assert_eq!(event.attempts[0].outcome, Some(AttemptOutcome::Complete));
    // The same answer again (a retried proposal) is the same success;
    // another answer finds the lease gone. Nothing changes either way.
    assert!(matches!(
        east.ack(&got[0], EventAck::Complete, 1_600),
        Ok(CommandResult::EventUpdated { event }) if event.status == EventStatus::Complete
    ));
    assert!(matches!(
        east.ack(
            &got[0],
            EventAck::Retry {
                delay_ms: None,
                reason: String::new()
            },
            1_600
        ),
        Err(StateError::LeaseLost { .. })
    ));
    assert!(east.lease("q", "c2", 10, 99_000).is_empty());
    let counts: BTreeMap<_, _> = queue_counts(&east.kv).unwrap().into_iter().collect();
    assert_eq!((counts["q"].pending, counts["q"].complete), (0, 1));
}

#[test]
fn retries_back_off_within_the_policy_then_dead_letter_with_every_attempt() {
    let mut east = Dc::new("east", &["east"]);
    east.rule(rule("all", "/in", "q"), 10); // 3 attempts, 100 ms doubling to 1 s
    east.put("/in", "x", 100);
    let mut now = 1_000;
    let mut id = None;
    for n in 1..=3u32 {
        let got = east.lease("q", "c1", 1, now);
        assert_eq!(got.len(), 1, "delivery {n}");
        assert_eq!(got[0].deliveries, n);
        id = Some(got[0].id);
        east.ack(
            &got[0],
            EventAck::Retry {
                delay_ms: None,
                reason: format!("downstream busy {n}"),
            },
            now,
        )
        .unwrap();
        let ev = east.event(&got[0].id);
        if n < 3 {
            assert_eq!(ev.status, EventStatus::Pending);
            let cap = 100 << (n - 1);
            assert!(
                ev.due_ms >= now && ev.due_ms <= now + cap,
                "retry {n} due {} not within [{now}, {}]",
                ev.due_ms,
                now + cap
            );
            if ev.due_ms > now {
                assert!(
                    east.lease("q", "c1", 1, ev.due_ms - 1).is_empty(),
                    "not before it is due"
                );
            }
            now = ev.due_ms;
        }
    }
    let ev = east.event(&id.unwrap());
    assert_eq!(ev.status, EventStatus::Failed);
    assert_eq!(ev.attempts.len(), 3);
    for (i, a) in ev.attempts.iter().enumerate() {
        assert_eq!(a.number, i as u32 + 1);
        assert_eq!(a.outcome, Some(AttemptOutcome::Retry));
        assert_eq!(a.error, format!("downstream busy {}", i + 1));
        assert_eq!(a.consumer, "c1");
    }
    let (dlq, _) = list_events(&east.kv, Some("q"), Some(EventStatus::Failed), None, 10).unwrap();
    assert_eq!(dlq.len(), 1);
    assert!(east.lease("q", "c1", 1, now + 1_000_000).is_empty());
}

#[test]
fn the_jitter_spreads_over_the_whole_window() {
    // Full jitter: over many events the waits cover [0, cap], not one point.
    let mut east = Dc::new("east", &["east"]);
    let mut r = rule("all", "/in", "q");
    r.retry.max_attempts = 10;
    r.retry.initial_backoff_ms = 10_000;
    r.retry.max_backoff_ms = 10_000;
    east.rule(r, 10);
    for i in 0..200 {
        east.put("/in", &format!("m{i}"), 100);
    }
    let got = east.lease("q", "c", 1000, 1_000);
    assert_eq!(got.len(), 200);
    let mut waits = Vec::new();
    for ev in &got {
        east.ack(
            ev,
            EventAck::Retry {
                delay_ms: None,
                reason: String::new(),
            },
            2_000,
        )
        .unwrap();
        waits.push(east.event(&ev.id).due_ms - 2_000);
    }
    assert!(waits.iter().all(|w| (0..=10_000).contains(w)));
    let low = waits.iter().filter(|w| **w < 2_500).count();
    let high = waits.iter().filter(|w| **w > 7_500).count();
    assert!(low > 20 && high > 20, "low {low}, high {high}: {waits:?}");
}

#[test]
fn an_expired_lease_is_a_failure_and_a_late_answer_changes_nothing() {
    let mut east = Dc::new("east", &["east"]);
    east.rule(rule("all", "/in", "q"), 10); // lease 1 s
    east.put("/in", "x", 100);
    let first = east.lease("q", "killed", 1, 1_000).remove(0);
    assert!(east.lease("q", "c2", 1, 1_999).is_empty(), "still leased");
    // At the lease's end the next lease call settles it: a failure, backed
    // off from the lease's end.
    assert!(east.lease("q", "c2", 1, 2_000).is_empty());
    let ev = east.event(&first.id);
    assert_eq!(ev.status, EventStatus::Pending);
    assert_eq!(ev.failures, 1);
    assert!(ev.due_ms >= 2_000 && ev.due_ms <= 2_100);
    assert_eq!(ev.attempts[0].outcome, Some(AttemptOutcome::Expired));
    let second = east.lease("q", "c2", 1, ev.due_ms).remove(0);
    assert_eq!(second.id, first.id, "same id");
    assert_eq!(second.deliveries, 2, "attempt + 1");
    // A late retry or fail for the expired delivery changes nothing.
    assert!(matches!(
        east.ack(
            &first,
            EventAck::Fail {
                reason: "late".into()
            },
            2_200
        ),
        Err(StateError::LeaseLost { attempt: 1, .. })
    ));
    assert_eq!(east.event(&first.id).status, EventStatus::Processing);
    east.ack(&second, EventAck::Complete, 2_300).unwrap();
    assert_eq!(east.event(&first.id).status, EventStatus::Complete);
    // The same answer again (a retried proposal) is the same success.
    let again = east.ack(&second, EventAck::Complete, 2_400).unwrap();
    assert!(
        matches!(again, CommandResult::EventUpdated { event } if event.status == EventStatus::Complete)
    );
}

#[test]
fn a_late_complete_after_the_lease_ran_out_completes_the_event() {
    let mut east = Dc::new("east", &["east"]);
    east.rule(rule("all", "/in", "q"), 10);
    east.put("/in", "x", 100);
    let first = east.lease("q", "slow", 1, 1_000).remove(0);
    east.run(Command::ExpireLeases {
        now_ms: 2_000,
        seed: 1,
    })
    .unwrap();
    let due = east.event(&first.id).due_ms;
    let second = east.lease("q", "c2", 1, due).remove(0);
    assert_eq!(second.deliveries, 2);
    // The slow consumer finishes after all: the event is complete, and the
    // second delivery's own complete is the same success.
    east.ack(&first, EventAck::Complete, due + 10).unwrap();
    let ev = east.event(&first.id);
    assert_eq!(ev.status, EventStatus::Complete);
    assert_eq!(ev.attempts[1].outcome, Some(AttemptOutcome::Complete));
    east.ack(&second, EventAck::Complete, due + 20).unwrap();
    assert!(east.lease("q", "c3", 1, due + 1_000_000).is_empty());
}

#[test]
fn progress_keeps_a_long_job_and_receiving_costs_no_attempt() {
    let mut east = Dc::new("east", &["east"]);
    east.rule(rule("all", "/in", "q"), 10); // lease 1 s, 3 attempts
    east.put("/in", "x", 100);
    let ev = east.lease("q", "slow", 1, 1_000).remove(0);
    let mut now = 1_000;
    for _ in 0..10 {
        now += 900;
        east.ack(&ev, EventAck::Progress { lease_ms: None }, now)
            .unwrap();
        assert!(east.lease("q", "other", 1, now + 500).is_empty());
        // The sweep does not take it either.
        east.run(Command::ExpireLeases {
            now_ms: now + 500,
            seed: 1,
        })
        .unwrap();
    }
    east.ack(&ev, EventAck::Complete, now + 100).unwrap();
    let done = east.event(&ev.id);
    assert_eq!(done.status, EventStatus::Complete);
    assert_eq!((done.deliveries, done.failures), (1, 0));
}

#[test]
fn the_sweep_settles_abandoned_leases_in_every_queue() {
    let mut east = Dc::new("east", &["east"]);
    let mut r = rule("all", "/in", "q");
    r.retry.max_attempts = 1;
    east.rule(r, 10);
    east.put("/in", "x", 100);
    let ev = east.lease("q", "gone", 1, 1_000).remove(0);
    let r = east
        .run(Command::ExpireLeases {
            now_ms: 2_000,
            seed: 7,
        })
        .unwrap();
    assert!(matches!(r, CommandResult::Expired { count: 1, .. }));
    assert_eq!(east.event(&ev.id).status, EventStatus::Failed);
}

#[test]
fn fail_dead_letters_at_once_and_replay_keeps_the_id_and_counts_on() {
    let mut east = Dc::new("east", &["east"]);
    east.rule(rule("all", "/in", "q"), 10);
    east.put("/in", "x", 100);
    let ev = east.lease("q", "c1", 1, 1_000).remove(0);
    east.ack(
        &ev,
        EventAck::Fail {
            reason: "bad EDI envelope".into(),
        },
        1_100,
    )
    .unwrap();
    let dead = east.event(&ev.id);
    assert_eq!(dead.status, EventStatus::Failed);
    assert_eq!(dead.attempts[0].error, "bad EDI envelope");
    // Replay: same id, next delivery number, a fresh budget.
    let r = east
        .run(Command::ReplayEvents {
            ids: vec![ev.id],
            force: false,
            now_ms: 5_000,
        })
        .unwrap();
    assert!(
        matches!(&r, CommandResult::EventsChanged { changed, refused } if changed == &[ev.id] && refused.is_empty())
    );
    let again = east.lease("q", "c1", 1, 5_000).remove(0);
    assert_eq!(again.id, ev.id);
    assert_eq!(again.deliveries, 2);
    for i in 0..2 {
        let cur = east.event(&ev.id);
        assert_eq!(cur.status, EventStatus::Processing, "retry {i}");
        east.ack(
            &cur,
            EventAck::Retry {
                delay_ms: Some(0),
                reason: "again".into(),
            },
            6_000,
        )
        .unwrap();
        east.lease("q", "c1", 1, 6_000);
    }
    // Two retries after the replay: within the budget of 3.
    assert_eq!(east.event(&ev.id).status, EventStatus::Processing);
    let cur = east.event(&ev.id);
    east.ack(&cur, EventAck::Complete, 6_100).unwrap();
    // Replaying a complete event needs force.
    let r = east
        .run(Command::ReplayEvents {
            ids: vec![ev.id],
            force: false,
            now_ms: 7_000,
        })
        .unwrap();
    assert!(
        matches!(&r, CommandResult::EventsChanged { changed, refused } if changed.is_empty() && refused[0].1.contains("--force"))
    );
    let r = east
        .run(Command::ReplayEvents {
            ids: vec![ev.id],
            force: true,
            now_ms: 7_000,
        })
        .unwrap();
    assert!(matches!(&r, CommandResult::EventsChanged { changed, .. } if changed.len() == 1));
    let forced = east.lease("q", "c1", 1, 7_000).remove(0);
    assert_eq!((forced.id, forced.deliveries), (ev.id, 5));
}

#[test]
fn discard_keeps_the_event_with_its_reason() {
    let mut east = Dc::new("east", &["east"]);
    east.rule(rule("all", "/in", "q"), 10);
    east.put("/in", "x", 100);
    let ev = east.lease("q", "c1", 1, 1_000).remove(0);
    let r = east
        .run(Command::DiscardEvents {
            ids: vec![ev.id],
            reason: "no".into(),
            now_ms: 1,
        })
        .unwrap();
    assert!(
        matches!(&r, CommandResult::EventsChanged { refused, .. } if refused.len() == 1),
        "not dead-lettered"
    );
    east.ack(&ev, EventAck::Fail { reason: "x".into() }, 1_100)
        .unwrap();
    east.run(Command::DiscardEvents {
        ids: vec![ev.id],
        reason: "partner withdrew the file".into(),
        now_ms: 2_000,
    })
    .unwrap();
    let d = east.event(&ev.id);
    assert_eq!(d.status, EventStatus::Discarded);
    assert_eq!(d.note, "partner withdrew the file");
    let (dlq, _) = list_events(&east.kv, None, Some(EventStatus::Failed), None, 10).unwrap();
    assert!(dlq.is_empty());
}

#[test]
fn per_mailbox_order_delivers_a_mailboxs_next_event_only_after_the_previous() {
    let mut east = Dc::new("east", &["east"]);
    let mut r = rule("ordered", "/in", "q");
    r.subtree = true;
    r.ordering = EventOrdering::PerMailbox;
    east.rule(r, 10);
    let a1 = east.put("/in", "1", 100);
    let a2 = east.put("/in", "2", 101);
    let a3 = east.put("/in", "3", 102);
    let b1 = east.put("/in/sub", "1", 103);
    // Two consumers asking for many: one event per mailbox.
    let got = east.lease("q", "c1", 10, 1_000);
    let ids: Vec<_> = got.iter().map(|e| e.message.id).collect();
    assert_eq!(ids.len(), 2);
    assert!(ids.contains(&a1.id) && ids.contains(&b1.id));
    assert!(east.lease("q", "c2", 10, 1_000).is_empty());
    let e1 = got.iter().find(|e| e.message.id == a1.id).unwrap();
    // A retry of the first keeps the rest waiting.
    east.ack(
        e1,
        EventAck::Retry {
            delay_ms: Some(0),
            reason: "later".into(),
        },
        1_100,
    )
    .unwrap();
    let again = east.lease("q", "c2", 10, 1_100);
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].message.id, a1.id);
    east.ack(&again[0], EventAck::Complete, 1_200).unwrap();
    let next = east.lease("q", "c2", 10, 1_200);
    assert_eq!(next.len(), 1);
    assert_eq!(next[0].message.id, a2.id);
    // Dead-lettering also lets the next one go.
    east.ack(&next[0], EventAck::Fail { reason: "x".into() }, 1_300)
        .unwrap();
    let last = east.lease("q", "c2", 10, 1_300);
    assert_eq!(last.len(), 1);
    assert_eq!(last[0].message.id, a3.id);
}

#[test]
fn evaluate_raises_only_what_is_missing() {
    let mut east = Dc::new("east", &["east"]);
    let before: Vec<_> = (0..5)
        .map(|i| east.put("/in", &format!("m{i}"), 100))
        .collect();
    east.put("/other", "o", 100);
    east.rule(rule("late", "/in", "q"), 10);
    let after = east.put("/in", "new", 200);
    assert_eq!(events_of_message(&east.kv, &after.id).unwrap().len(), 1);
    let mut added = 0;
    let mut from = None;
    loop {
        let r = east
            .run(Command::EvaluateRule {
                name: "late".into(),
                after: from,
                limit: 2,
                now_ms: 300,
            })
            .unwrap();
        let CommandResult::Evaluated { added: a, next, .. } = r else {
            panic!()
        };
        added += a;
        from = next;
        if from.is_none() {
            break;
        }
    }
    assert_eq!(
        added, 5,
        "the five older messages, not the new one nor /other"
    );
    for m in &before {
        assert_eq!(events_of_message(&east.kv, &m.id).unwrap().len(), 1);
    }
    let r = east
        .run(Command::EvaluateRule {
            name: "late".into(),
            after: None,
            limit: 100,
            now_ms: 400,
        })
        .unwrap();
    assert!(matches!(r, CommandResult::Evaluated { added: 0, .. }));
    assert!(matches!(
        east.run(Command::EvaluateRule {
            name: "nope".into(),
            after: None,
            limit: 1,
            now_ms: 1
        }),
        Err(StateError::RuleNotFound { .. })
    ));
}

#[test]
fn event_state_is_the_same_on_every_node() {
    // Two nodes applying the same log end with the same bytes (time and
    // randomness come from the commands).
    let mut a = Dc::new("east", &["east"]);
    let mut log = vec![Command::PutRule {
        rule: rule("all", "/in", "q"),
        wall_ms: 5,
    }];
    a.run(log[0].clone()).unwrap();
    for i in 0..20 {
        let m = MessageMeta {
            id: MessageId::new(),
            mailbox: mb("/in"),
            name: format!("m{i}"),
            size: 3,
            sha256: Digest::of(b"abc"),
            created_ms: 100,
            origin_dc: "east".into(),
            attributes: BTreeMap::new(),
            payload: Payload::Inline,
        };
        log.push(Command::PutMessage {
            meta: m,
            inline: Some(b"abc".to_vec()),
            idempotency_key: None,
        });
    }
    log.push(Command::LeaseEvents {
        queue: "q".into(),
        consumer: "c".into(),
        max: 20,
        lease_ms: None,
        now_ms: 1_000,
        seed: 42,
        request: 9,
    });
    log.push(Command::ExpireLeases {
        now_ms: 5_000,
        seed: 43,
    });
    let mut b = Dc::new("east", &["east"]);
    for c in &log[1..] {
        a.run(c.clone()).unwrap();
    }
    for c in &log {
        b.run(c.clone()).unwrap();
    }
    assert_eq!(a.kv.0, b.kv.0);
}

#[test]
fn new_variant_numbers_are_stable() {
    fn tag<T: serde::Serialize>(v: &T) -> u32 {
        let b = bincode::serialize(v).unwrap();
        u32::from_le_bytes(b[..4].try_into().unwrap())
    }
    assert_eq!(
        tag(&Command::DeleteRule {
            name: String::new(),
            wall_ms: 0
        }),
        16
    );
    assert_eq!(tag(&Command::ExpireLeases { now_ms: 0, seed: 0 }), 22);
    assert_eq!(
        tag(&FeedRecord::Rule {
            name: String::new(),
            rule: None,
            stamp: Stamp::default()
        }),
        7
    );
    assert_eq!(tag(&CommandResult::Leased { events: vec![] }), 11);
    assert_eq!(
        tag(&Command::SuspendDc {
            dc: String::new(),
            suspended: false,
            reason: String::new(),
            wall_ms: 0
        }),
        23
    );
    assert_eq!(
        tag(&StateError::RuleNotFound {
            name: String::new()
        }),
        13
    );
    assert_eq!(
        tag(&Command::TakeoverQueue {
            queue: String::new(),
            dc: None,
            reason: String::new(),
            wall_ms: 0,
            force: false
        }),
        25
    );
    assert_eq!(
        tag(&FeedRecord::QueueOwner {
            queue: String::new(),
            owner: QueueOwner::default()
        }),
        10
    );
}

#[test]
fn a_retried_lease_request_gets_the_same_events_not_more() {
    let mut east = Dc::new("east", &["east"]);
    east.rule(rule("all", "/in", "q"), 10);
    for i in 0..4 {
        east.put("/in", &format!("m{i}"), 100);
    }
    let first = east.lease_as("q", "c", 2, 1_000, 77);
    // The reply was lost and the proposal is applied again: the same two,
    // not two more leased to nobody.
    let again = east.lease_as("q", "c", 2, 1_050, 77);
    let ids = |v: &[Event]| v.iter().map(|e| (e.id, e.deliveries)).collect::<Vec<_>>();
    assert_eq!(ids(&first), ids(&again));
    let counts: BTreeMap<_, _> = queue_counts(&east.kv).unwrap().into_iter().collect();
    assert_eq!((counts["q"].processing, counts["q"].pending), (2, 2));
    // A new request gets the others.
    assert_eq!(east.lease_as("q", "c", 10, 1_100, 78).len(), 2);
}

#[test]
fn a_dc_leaving_the_cluster_completes_what_only_it_lacked() {
    let mut east = Dc::new("east", &["east", "west", "north"]);
    let mut west = Dc::new("west", &["east", "west", "north"]);
    east.rule(rule("all", "/in", "q"), 10);
    let m = east.put("/in", "x", 100);
    west.pull(&east);
    east.pull(&west);
    assert!(
        events_of_message(&east.kv, &m.id).unwrap().is_empty(),
        "north lacks it"
    );
    east.run(Command::SetClusterDcs {
        dcs: vec!["east".into(), "west".into()],
    })
    .unwrap();
    // The re-check runs in pages, proposed while one is due.
    assert!(crate::replication::recheck_due(&east.kv).unwrap());
    east.recheck();
    assert!(!crate::replication::recheck_due(&east.kv).unwrap());
    let evs = events_of_message(&east.kv, &m.id).unwrap();
    assert_eq!(evs.len(), 1);
    assert_eq!(evs[0].due_ms, 1000, "due from its completion");
    // Setting the list again raises nothing more.
    east.run(Command::SetClusterDcs {
        dcs: vec!["east".into(), "west".into()],
    })
    .unwrap();
    east.recheck();
    assert_eq!(events_of_message(&east.kv, &m.id).unwrap().len(), 1);
}

#[test]
fn deleted_rules_do_not_hide_rules_in_force_and_deletes_retry_as_success() {
    let mut east = Dc::new("east", &["east"]);
    for i in 0..(MAX_RULES + 5) {
        let name = format!("a{i:05}");
        east.rule(rule(&name, "/in", "q"), 10);
        east.run(Command::DeleteRule {
            name: name.clone(),
            wall_ms: 11,
        })
        .unwrap();
        if i == 0 {
            // Applied again (a retried proposal): the same success.
            east.run(Command::DeleteRule { name, wall_ms: 11 }).unwrap();
        }
    }
    east.rule(rule("zz-live", "/in", "live"), 20);
    let m = east.put("/in", "x", 100);
    let evs = events_of_message(&east.kv, &m.id).unwrap();
    assert_eq!(evs.len(), 1);
    assert_eq!(evs[0].rule, "zz-live");
}

#[test]
fn replay_and_discard_applied_twice_are_the_same_success() {
    let mut east = Dc::new("east", &["east"]);
    east.rule(rule("all", "/in", "q"), 10);
    east.put("/in", "x", 100);
    let ev = east.lease("q", "c1", 1, 1_000).remove(0);
    east.ack(&ev, EventAck::Fail { reason: "x".into() }, 1_100)
        .unwrap();
    let replay = Command::ReplayEvents {
        ids: vec![ev.id],
        force: false,
        now_ms: 2_000,
    };
    for _ in 0..2 {
        let r = east.run(replay.clone()).unwrap();
        assert!(
            matches!(&r, CommandResult::EventsChanged { changed, refused } if changed.len() == 1 && refused.is_empty()),
            "{r:?}"
        );
    }
    let ev = east.lease("q", "c1", 1, 2_000).remove(0);
    east.ack(&ev, EventAck::Fail { reason: "y".into() }, 2_100)
        .unwrap();
    let discard = Command::DiscardEvents {
        ids: vec![ev.id],
        reason: "gone".into(),
        now_ms: 3_000,
    };
    for _ in 0..2 {
        let r = east.run(discard.clone()).unwrap();
        assert!(
            matches!(&r, CommandResult::EventsChanged { changed, refused } if changed.len() == 1 && refused.is_empty()),
            "{r:?}"
        );
    }
}

#[test]
fn a_suspended_dc_lets_messages_complete_without_it_and_nothing_fires_twice() {
    let mut east = Dc::new("east", &["east", "west"]);
    let mut west = Dc::new("west", &["east", "west"]);
    east.rule(rule("all", "/in", "q"), 10);
    let waiting = east.put("/in", "before", 100);
    assert!(events_of_message(&east.kv, &waiting.id).unwrap().is_empty());
    assert!(matches!(
        east.run(Command::SuspendDc {
            dc: "east".into(),
            suspended: true,
            reason: "x".into(),
            wall_ms: 1
        }),
        Err(StateError::Invalid { .. })
    ));
    assert!(matches!(
        east.run(Command::SuspendDc {
            dc: "mars".into(),
            suspended: true,
            reason: "x".into(),
            wall_ms: 1
        }),
        Err(StateError::Invalid { .. })
    ));
    east.run(Command::SuspendDc {
        dc: "west".into(),
        suspended: true,
        reason: "west is down for maintenance".into(),
        wall_ms: 200,
    })
    .unwrap();
    east.recheck();
    // What waited only for west completes now, and new uploads at once.
    let evs = events_of_message(&east.kv, &waiting.id).unwrap();
    assert_eq!(evs.len(), 1);
    assert_eq!(evs[0].without, ["west"]);
    let during = east.put("/in", "during", 300);
    assert_eq!(
        events_of_message(&east.kv, &during.id).unwrap()[0].without,
        ["west"]
    );
    // West comes back and catches up: its holds raise nothing more.
    west.pull(&east);
    east.pull(&west);
    for m in [&waiting, &during] {
        assert_eq!(events_of_message(&east.kv, &m.id).unwrap().len(), 1);
    }
    // West learned it was suspended (cluster configuration).
    assert!(suspensions(&west.kv).unwrap()[0].1.suspended);
    // Resumed: new messages wait for west again.
    east.run(Command::SuspendDc {
        dc: "west".into(),
        suspended: false,
        reason: String::new(),
        wall_ms: 400,
    })
    .unwrap();
    let after = east.put("/in", "after", 500);
    assert!(events_of_message(&east.kv, &after.id).unwrap().is_empty());
    west.pull(&east);
    east.pull(&west);
    let evs = events_of_message(&east.kv, &after.id).unwrap();
    assert_eq!(evs.len(), 1);
    assert!(evs[0].without.is_empty());
}

#[test]
fn the_completion_recheck_runs_in_bounded_pages() {
    use crate::replication::RECHECK_PAGE;
    let mut east = Dc::new("east", &["east", "west"]);
    east.rule(rule("all", "/in", "q"), 10);
    let n = RECHECK_PAGE * 2 + 7;
    for i in 0..n {
        east.put("/in", &format!("m{i}"), 100);
    }
    east.run(Command::SuspendDc {
        dc: "west".into(),
        suspended: true,
        reason: "down".into(),
        wall_ms: 200,
    })
    .unwrap();
    let counts = |dc: &Dc| {
        queue_counts(&dc.kv)
            .unwrap()
            .into_iter()
            .next()
            .map_or(0, |(_, c)| c.raised)
    };
    assert_eq!(
        counts(&east),
        0,
        "nothing done inside the suspension itself"
    );
    let mut pages = 0;
    loop {
        pages += 1;
        match east
            .run(Command::RecheckCompletion { now_ms: 300 })
            .unwrap()
        {
            CommandResult::Expired { count, more } => {
                assert!(count as usize <= RECHECK_PAGE);
                if !more {
                    break;
                }
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(counts(&east) as usize, n);
    // Nothing left incomplete, and a re-check now does nothing.
    assert!(east
        .kv
        .scan(crate::keys::INCOMPLETE_PREFIX, None, 10)
        .unwrap()
        .is_empty());
}

#[test]
fn an_unbounded_scan_with_a_pending_delete_reads_everything() {
    // usize::MAX plus the pending deletes used to overflow inside apply.
    let mut kv = MemKv::default();
    for i in 0..5u8 {
        kv.0.insert(vec![b'P', i], vec![]);
    }
    let mut ov = Overlay::new();
    ov.delete(vec![b'P', 2]);
    ov.put(vec![b'P', 9], vec![]);
    let rows = ov.scan(&kv, b"P", None, usize::MAX).unwrap();
    let keys: Vec<u8> = rows.iter().map(|(k, _)| k[1]).collect();
    assert_eq!(keys, [0, 1, 3, 4, 9]);
}

#[test]
fn a_deferred_delivery_costs_no_attempt() {
    let mut east = Dc::new("east", &["east"]);
    let mut r = rule("all", "/in", "q");
    r.retry.max_attempts = 1;
    east.rule(r, 10);
    east.put("/in", "x", 100);
    for i in 0..5 {
        let now = 1_000 + i * 1_000;
        let ev = east.lease("q", "webhook", 1, now).remove(0);
        east.ack(
            &ev,
            EventAck::Defer {
                delay_ms: 500,
                reason: "receiver unreachable".into(),
            },
            now,
        )
        .unwrap();
        let cur = east.event(&ev.id);
        assert_eq!((cur.status, cur.failures), (EventStatus::Pending, 0));
        assert_eq!(cur.due_ms, now + 500);
        assert_eq!(
            cur.attempts.last().unwrap().outcome,
            Some(AttemptOutcome::Deferred)
        );
    }
    let ev = east.lease("q", "webhook", 1, 10_000).remove(0);
    assert_eq!(ev.deliveries, 6);
    east.ack(&ev, EventAck::Complete, 10_001).unwrap();
    assert_eq!(east.event(&ev.id).status, EventStatus::Complete);
}

#[test]
fn the_due_floor_stands_past_the_leased_events_of_one_millisecond() {
    let mut east = Dc::new("east", &["east"]);
    for i in 0..10 {
        east.put("/in", &format!("m{i}"), 100 + i);
    }
    // Added after the messages, raised by one evaluate page: all ten due
    // at the same millisecond.
    east.rule(rule("all", "/in", "q"), 200);
    match east
        .run(Command::EvaluateRule {
            name: "all".into(),
            after: None,
            limit: 100,
            now_ms: 500,
        })
        .unwrap()
    {
        CommandResult::Evaluated { added, .. } => assert_eq!(added, 10),
        other => panic!("{other:?}"),
    }
    let floor = |dc: &Dc| queue_counts(&dc.kv).unwrap()[0].1.floor("east");
    let first = east.lease("q", "c", 4, 600);
    assert_eq!(first.len(), 4);
    // The floor is inside the millisecond, past the four leased (their
    // deleted entries are not stepped over again), before the fifth.
    let f = floor(&east);
    assert_eq!(f.0, 500);
    assert!(f.1 >= *first.iter().map(|e| e.id).max().unwrap().as_bytes());
    assert_eq!(next_due(&east.kv, "east", "q", 10_000).unwrap(), Some(500));
    let rest = east.lease("q", "c", 10, 700);
    assert_eq!(rest.len(), 6);
    let mut all: Vec<_> = first.iter().chain(&rest).map(|e| e.id).collect();
    all.sort();
    all.dedup();
    assert_eq!(all.len(), 10, "every event leased once");
}

#[test]
fn the_due_floor_rises_past_answered_events_and_falls_for_earlier_ones() {
    let mut east = Dc::new("east", &["east"]);
    east.rule(rule("all", "/in", "q"), 10); // lease 1 s
    for i in 0..10 {
        east.put("/in", &format!("m{i}"), 100 + i);
    }
    let floor = |dc: &Dc| queue_counts(&dc.kv).unwrap()[0].1.floor("east");
    let got = east.lease("q", "c", 10, 1_000);
    assert_eq!(got.len(), 10);
    // Everything is leased until 2,000: the next lease scan moves the
    // floor past now (it reads only what is due by now), past the deleted
    // entries of the pending ones.
    assert!(east.lease("q", "c", 10, 1_500).is_empty());
    assert_eq!(floor(&east).0, 1_501);
    assert_eq!(
        next_due(&east.kv, "east", "q", 10_000).unwrap(),
        Some(2_000)
    );
    assert_eq!(next_due(&east.kv, "east", "q", 1_999).unwrap(), None);
    // A new event due before the floor lowers it, and is found.
    let late = east.put("/in", "late", 1_600);
    assert!(floor(&east).0 <= 1_600);
    let e = east.lease("q", "c", 10, 1_700);
    assert_eq!(e.len(), 1);
    assert_eq!(e[0].message.id, late.id);
    for ev in &got {
        east.ack(ev, EventAck::Complete, 1_800).unwrap();
    }
    // All answered: the floor rises to now, and nothing is lost after it.
    assert!(east.lease("q", "c", 10, 1_900).is_empty());
    let again = east.put("/in", "again", 1_950);
    assert_eq!(east.lease("q", "c", 10, 2_000)[0].message.id, again.id);
}

#[test]
fn leases_in_one_batch_with_equal_and_earlier_clocks_lose_nothing() {
    // Proposers' clocks differ: a later lease command may carry an earlier
    // now than the one before it, in the same batch or the next.
    let mut east = Dc::new("east", &["east"]);
    east.rule(rule("all", "/in", "q"), 10);
    for i in 0..6 {
        east.put("/in", &format!("m{i}"), 100 + i);
    }
    let lease = |now: i64, request: u64| Command::LeaseEvents {
        queue: "q".into(),
        consumer: format!("c{request}"),
        max: 2,
        lease_ms: None,
        now_ms: now,
        seed: 1,
        request,
    };
    let r = east
        .run(Command::Batch(vec![
            lease(1_000, 1),
            lease(1_000, 2),
            lease(900, 3),
        ]))
        .unwrap();
    let CommandResult::Batch(rs) = r else {
        panic!()
    };
    let n: Vec<usize> = rs
        .into_iter()
        .map(|r| match r.unwrap() {
            CommandResult::Leased { events } => events.len(),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(
        n,
        [2, 2, 2],
        "each command leases what is due by its own now"
    );
    // A file raised by a proposer whose clock is behind the floor is found.
    let late = east.put("/in", "late", 950);
    let got = east.lease_as("q", "c9", 10, 960, 99);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].message.id, late.id);
    let counts: BTreeMap<_, _> = queue_counts(&east.kv).unwrap().into_iter().collect();
    assert_eq!((counts["q"].processing, counts["q"].pending), (7, 0));
}

/// Two DCs whose message `n` completed at `east` (the origin), both
/// knowing rule `rule`; returns the messages.
fn completed_at_east(
    east: &mut Dc,
    west: &mut Dc,
    r: EventRule,
    mailbox: &str,
    n: usize,
) -> Vec<MessageMeta> {
    east.rule(r, 10);
    let ms: Vec<_> = (0..n)
        .map(|i| east.put(mailbox, &format!("m{i}"), 100 + i as i64))
        .collect();
    west.pull(east);
    east.pull(west);
    west.pull(east);
    ms
}

/// A forced takeover (tests of the silence check use [`try_takeover`]).
fn takeover(dc: &mut Dc, queue: &str, to: Option<&str>, wall_ms: i64) {
    try_takeover(dc, queue, to, wall_ms, true).unwrap();
}

fn try_takeover(
    dc: &mut Dc,
    queue: &str,
    to: Option<&str>,
    wall_ms: i64,
    force: bool,
) -> CommandResponse {
    dc.run(Command::TakeoverQueue {
        queue: queue.into(),
        dc: to.map(str::to_string),
        reason: "east is down".into(),
        wall_ms,
        force,
    })
}

fn handled_elsewhere(r: CommandResponse) -> String {
    match r {
        Err(StateError::HandledElsewhere { dc, .. }) => dc,
        other => panic!("expected HandledElsewhere, got {other:?}"),
    }
}

#[test]
fn events_replicate_and_only_the_handling_dc_acts_on_them() {
    let mut east = Dc::new("east", &["east", "west"]);
    let mut west = Dc::new("west", &["east", "west"]);
    let ms = completed_at_east(&mut east, &mut west, rule("all", "/in", "q"), "/in", 2);
    let id0 = EventId::for_message(&ms[0].id, "all");
    assert_eq!(west.event(&id0).status, EventStatus::Pending);
    // West holds the events but does not deliver them: east does (west
    // delivers only the events it raised itself).
    assert!(west.lease("q", "w", 10, 2_000).is_empty());
    let got = east.lease("q", "c1", 10, 2_000);
    assert_eq!(got.len(), 2);
    west.pull(&east);
    assert_eq!(west.event(&id0).status, EventStatus::Processing);
    assert_eq!(
        west.event(&id0),
        east.event(&id0),
        "the same state, stamp and all"
    );
    // West's sweep of leases that ran out leaves east's leases alone.
    west.run(Command::ExpireLeases {
        now_ms: 1_000_000,
        seed: 1,
    })
    .unwrap();
    assert_eq!(west.event(&id0).status, EventStatus::Processing);
    assert_eq!(
        handled_elsewhere(west.ack(&got[0], EventAck::Complete, 2_100)),
        "east"
    );
    east.ack(&got[0], EventAck::Complete, 2_100).unwrap();
    east.ack(
        &got[1],
        EventAck::Fail {
            reason: "bad file".into(),
        },
        2_100,
    )
    .unwrap();
    west.pull(&east);
    for id in got.iter().map(|e| e.id) {
        assert_eq!(west.event(&id), east.event(&id));
    }
    let counts: BTreeMap<_, _> = queue_counts(&west.kv).unwrap().into_iter().collect();
    assert_eq!((counts["q"].complete, counts["q"].failed), (1, 1));
    // Replaying at west is refused with where to go.
    match west
        .run(Command::ReplayEvents {
            ids: vec![got[1].id],
            force: false,
            now_ms: 3_000,
        })
        .unwrap()
    {
        CommandResult::EventsChanged { changed, refused } => {
            assert!(changed.is_empty());
            assert!(refused[0].1.contains("handled by DC east"), "{refused:?}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_takeover_delivers_what_was_not_complete_once_and_never_what_was() {
    let mut east = Dc::new("east", &["east", "west"]);
    let mut west = Dc::new("west", &["east", "west"]);
    let ms = completed_at_east(&mut east, &mut west, rule("all", "/in", "q"), "/in", 4);
    // East: the first completes, the second is leased when east dies, the
    // third waits for a retry, the fourth was never delivered.
    let got = east.lease("q", "c1", 3, 2_000);
    assert_eq!(got.len(), 3);
    let mut ids: Vec<EventId> = got.iter().map(|e| e.id).collect();
    let rest: Vec<EventId> = ms
        .iter()
        .map(|m| EventId::for_message(&m.id, "all"))
        .filter(|id| !ids.contains(id))
        .collect();
    ids.extend(rest);
    assert_eq!(ids.len(), 4);
    east.ack(&got[0], EventAck::Complete, 2_100).unwrap();
    east.ack(
        &got[2],
        EventAck::Retry {
            delay_ms: Some(500),
            reason: "busy".into(),
        },
        2_100,
    )
    .unwrap();
    west.pull(&east);
    // East is gone. West takes the queue over.
    takeover(&mut west, "q", Some("west"), 2_200);
    let first = west.lease("q", "w1", 10, 2_300);
    let mut first_ids: Vec<_> = first.iter().map(|e| e.id).collect();
    first_ids.sort();
    assert_eq!(
        first_ids,
        vec![ids[3]],
        "only what is due: not the complete one, not the leased one, not the retry"
    );
    // After the retry's delay and the dead lease's end: both, the leased
    // one as its next delivery (same id, attempt 2; east's consumer could
    // not answer here, so no attempt is counted against it).
    west.run(Command::ExpireLeases {
        now_ms: 3_050,
        seed: 7,
    })
    .unwrap();
    let later = west.lease("q", "w1", 10, 3_100);
    let by_id: BTreeMap<_, _> = later.iter().map(|e| (e.id, e)).collect();
    assert_eq!(by_id.len(), 2, "{later:?}");
    assert_eq!(by_id[&ids[1]].deliveries, 2);
    assert_eq!(
        by_id[&ids[1]].attempts[0].outcome,
        Some(AttemptOutcome::Expired)
    );
    assert_eq!(by_id[&ids[1]].failures, 0);
    assert_eq!(by_id[&ids[2]].deliveries, 2);
    for e in first.iter().chain(later.iter()) {
        west.ack(e, EventAck::Complete, 3_200).unwrap();
    }
    assert!(west.lease("q", "w1", 10, 30_000).is_empty());
    assert_eq!(
        west.event(&ids[0]).deliveries,
        1,
        "the completed one was never delivered again"
    );
    // East comes back: it learns the outcome and the owner, and does not
    // deliver the queue; what it raises now, west delivers. (Its first
    // housekeeping records the outage; what it pulls after is news.)
    east.run(Command::ExpireLeases {
        now_ms: 199_000,
        seed: 1,
    })
    .unwrap();
    east.pull(&west);
    for id in &ids {
        assert_eq!(east.event(id).status, EventStatus::Complete);
        assert_eq!(east.event(id), west.event(id));
    }
    let err = east.run(Command::LeaseEvents {
        queue: "q".into(),
        consumer: "e".into(),
        max: 10,
        lease_ms: None,
        now_ms: 200_000,
        seed: 1,
        request: 99,
    });
    assert_eq!(handled_elsewhere(err), "west");
    let m = east.put("/in", "late", 5_000);
    west.pull(&east);
    east.pull(&west);
    west.pull(&east);
    let id = EventId::for_message(&m.id, "all");
    assert_eq!(
        east.event(&id).status,
        EventStatus::Pending,
        "raised at its origin"
    );
    west.tick_to(200_000);
    let got = west.lease("q", "w1", 10, 200_000);
    assert_eq!(got.iter().map(|e| e.id).collect::<Vec<_>>(), vec![id]);
    // Handed back: east delivers its own lane again, west nothing of it.
    west.ack(
        &got[0],
        EventAck::Retry {
            delay_ms: Some(0),
            reason: "x".into(),
        },
        200_001,
    )
    .unwrap();
    takeover(&mut west, "q", None, 200_002);
    east.pull(&west);
    assert!(west.lease("q", "w1", 10, 220_000).is_empty());
    let got = east.lease("q", "e1", 10, 220_000);
    assert_eq!(got.iter().map(|e| e.id).collect::<Vec<_>>(), vec![id]);
    assert_eq!(got[0].deliveries, 2);
}

#[test]
fn a_taken_over_mailbox_chain_goes_on_in_order() {
    let mut east = Dc::new("east", &["east", "west"]);
    let mut west = Dc::new("west", &["east", "west"]);
    let mut r = rule("ordered", "/in", "q");
    r.ordering = EventOrdering::PerMailbox;
    let ms = completed_at_east(&mut east, &mut west, r, "/in", 1);
    let a = EventId::for_message(&ms[0].id, "ordered");
    // B completes at east behind A (east's chain: A, then B waiting).
    let mb_ = east.put("/in", "b", 1_500);
    west.pull(&east);
    east.pull(&west);
    let b = EventId::for_message(&mb_.id, "ordered");
    assert!(east.event(&b).blocked);
    // West takes over (east only cut off) and completes A before B's
    // event reaches it.
    takeover(&mut west, "q", Some("west"), 2_000);
    let got = west.lease("q", "w", 10, 2_100);
    assert_eq!(got.iter().map(|e| e.id).collect::<Vec<_>>(), vec![a]);
    west.ack(&got[0], EventAck::Complete, 2_200).unwrap();
    // B arrives waiting behind A, which west finished: west releases it.
    west.pull(&east);
    let got = west.lease("q", "w", 10, 10_000);
    assert_eq!(got.iter().map(|e| e.id).collect::<Vec<_>>(), vec![b]);
    east.pull(&west);
    assert_eq!(east.event(&b), west.event(&b));
    assert_eq!(east.event(&a).status, EventStatus::Complete);
}

#[test]
fn a_resynced_dc_gets_every_event_and_owner() {
    let mut east = Dc::new("east", &["east", "west"]);
    let mut west = Dc::new("west", &["east", "west"]);
    let mut ordered = rule("ordered", "/in", "q2");
    ordered.ordering = EventOrdering::PerMailbox;
    east.rule(ordered, 9);
    let ms = completed_at_east(&mut east, &mut west, rule("all", "/in", "q"), "/in", 3);
    let got = east.lease("q", "c", 1, 2_000);
    east.ack(&got[0], EventAck::Complete, 2_100).unwrap();
    takeover(&mut east, "q", Some("east"), 2_200);
    // The ordered queue: the first running, the other two waiting.
    let running = east.lease("q2", "c", 10, 2_300);
    assert_eq!(running.len(), 1);
    // A third DC, new: it learns everything from east's state.
    let mut north = Dc::new("north", &["east", "west", "north"]);
    let mut after: Option<Vec<u8>> = None;
    loop {
        let (records, next) = crate::replication::resync_page(
            &east.kv,
            "east",
            "north",
            after.as_deref(),
            2,
            1 << 20,
        )
        .unwrap();
        north
            .run(Command::ApplyResync {
                origin: "east".into(),
                identity: String::new(),
                records,
                received_ms: 3_000,
                payload_here: vec![],
                floor: 0,
                done: next.is_none(),
            })
            .unwrap();
        match next {
            Some(n) => after = Some(n),
            None => break,
        }
    }
    for m in &ms {
        for r in ["all", "ordered"] {
            let id = EventId::for_message(&m.id, r);
            assert_eq!(north.event(&id), east.event(&id));
        }
    }
    assert_eq!(
        queue_handler(&north.kv, "q").unwrap().as_deref(),
        Some("east")
    );
    // The chain came over as east had it: one running, none released.
    let waiting = ms
        .iter()
        .filter(|m| north.event(&EventId::for_message(&m.id, "ordered")).blocked)
        .count();
    assert_eq!(waiting, 2);
    assert_eq!(
        runners(&north.kv, &Overlay::default(), &running[0]).unwrap(),
        1
    );
}

#[test]
fn an_old_handler_that_missed_the_takeover_cannot_undo_a_completion() {
    let mut east = Dc::new("east", &["east", "west"]);
    let mut west = Dc::new("west", &["east", "west"]);
    let ms = completed_at_east(&mut east, &mut west, rule("all", "/in", "q"), "/in", 1);
    let id = EventId::for_message(&ms[0].id, "all");
    // East is cut off, not dead: west takes over and completes the event;
    // east, with its clock far ahead, leases it again meanwhile.
    takeover(&mut west, "q", Some("west"), 2_000);
    let w = west.lease("q", "w", 1, 2_100);
    west.ack(&w[0], EventAck::Complete, 2_200).unwrap();
    let e = east.lease("q", "e", 1, 900_000);
    assert_eq!(e.len(), 1, "east does not know yet");
    assert!(east.event(&id).stamp > west.event(&id).stamp);
    // Healed: the completion stands everywhere, and east stops delivering.
    east.pull(&west);
    west.pull(&east);
    for dc in [&east, &west] {
        assert_eq!(dc.event(&id).status, EventStatus::Complete);
    }
    assert_eq!(east.event(&id), west.event(&id));
    let err = east.run(Command::LeaseEvents {
        queue: "q".into(),
        consumer: "e".into(),
        max: 1,
        lease_ms: None,
        now_ms: 900_500,
        seed: 1,
        request: 777,
    });
    assert_eq!(handled_elsewhere(err), "west");
    // A replay (a new generation) is delivered again, by the handler.
    match west
        .run(Command::ReplayEvents {
            ids: vec![id],
            force: true,
            now_ms: 3_000,
        })
        .unwrap()
    {
        CommandResult::EventsChanged { changed, .. } => assert_eq!(changed, vec![id]),
        other => panic!("{other:?}"),
    }
    east.pull(&west);
    assert_eq!(east.event(&id).status, EventStatus::Pending);
}

#[test]
fn a_lease_on_its_last_attempt_when_the_old_handler_died_is_delivered_again() {
    let mut east = Dc::new("east", &["east", "west"]);
    let mut west = Dc::new("west", &["east", "west"]);
    let mut r = rule("all", "/in", "q");
    r.retry.max_attempts = 1;
    let ms = completed_at_east(&mut east, &mut west, r, "/in", 1);
    let id = EventId::for_message(&ms[0].id, "all");
    east.lease("q", "e", 1, 2_000);
    west.pull(&east);
    takeover(&mut west, "q", Some("west"), 2_100);
    west.run(Command::ExpireLeases {
        now_ms: 3_500,
        seed: 1,
    })
    .unwrap();
    let got = west.lease("q", "w", 1, 3_600);
    assert_eq!(got.len(), 1, "{:?}", west.event(&id));
    assert_eq!((got[0].id, got[0].deliveries, got[0].failures), (id, 2, 0));
}

#[test]
fn an_old_handler_coming_back_cannot_dead_letter_what_the_new_one_delivers() {
    let mut east = Dc::new("east", &["east", "west"]);
    let mut west = Dc::new("west", &["east", "west"]);
    let mut r = rule("all", "/in", "q");
    r.retry.max_attempts = 1;
    let ms = completed_at_east(&mut east, &mut west, r, "/in", 1);
    let id = EventId::for_message(&ms[0].id, "all");
    // East dies holding the event's last attempt; west takes over and
    // delivers it again.
    east.lease("q", "e", 1, 2_000);
    west.pull(&east);
    takeover(&mut west, "q", Some("west"), 2_100);
    west.run(Command::ExpireLeases {
        now_ms: 3_500,
        seed: 1,
    })
    .unwrap();
    let w = west.lease("q", "w", 1, 3_600);
    assert_eq!((w.len(), w[0].deliveries), (1, 2));
    // East was cut off, not down: it settles its own lease on time, before
    // it hears of the takeover. By its lights the last attempt ran out, so
    // it dead-letters the event.
    east.run(Command::ExpireLeases {
        now_ms: 3_100,
        seed: 2,
    })
    .unwrap();
    assert_eq!(east.event(&id).status, EventStatus::Failed);
    // Healed: the new handler's delivery stands in both DCs (a change made
    // without knowing of the takeover does not outrank one made after it),
    // and its consumer's answer completes the event everywhere.
    west.pull(&east);
    east.pull(&west);
    for dc in [&east, &west] {
        let e = dc.event(&id);
        assert_eq!(
            (e.status, e.deliveries),
            (EventStatus::Processing, 2),
            "{}",
            dc.ctx.local_dc
        );
    }
    west.ack(&w[0], EventAck::Complete, 3_700).unwrap();
    east.pull(&west);
    for dc in [&east, &west] {
        assert_eq!(dc.event(&id).status, EventStatus::Complete);
    }
    assert_eq!(east.event(&id), west.event(&id));
}

#[test]
fn a_chain_released_by_an_old_handler_still_runs_one_event_at_a_time() {
    let mut east = Dc::new("east", &["east", "west"]);
    let mut west = Dc::new("west", &["east", "west"]);
    let mut r = rule("all", "/in", "q");
    r.retry.max_attempts = 1;
    r.ordering = EventOrdering::PerMailbox;
    let ms = completed_at_east(&mut east, &mut west, r, "/in", 2);
    let (a, b) = (
        EventId::for_message(&ms[0].id, "all"),
        EventId::for_message(&ms[1].id, "all"),
    );
    east.lease("q", "e", 2, 2_000);
    west.pull(&east);
    takeover(&mut west, "q", Some("west"), 2_100);
    west.run(Command::ExpireLeases {
        now_ms: 3_500,
        seed: 1,
    })
    .unwrap();
    let w = west.lease("q", "w", 2, 3_600);
    assert_eq!(w.iter().map(|e| e.id).collect::<Vec<_>>(), vec![a]);
    // East, cut off, dead-letters `a` on time and so releases `b`.
    east.run(Command::ExpireLeases {
        now_ms: 3_100,
        seed: 2,
    })
    .unwrap();
    assert!(!east.event(&b).blocked);
    west.pull(&east);
    east.pull(&west);
    // `a` runs at west: `b` is not delivered beside it, even though the
    // copy west took from east says it may be.
    assert_eq!(west.event(&a).status, EventStatus::Processing);
    assert!(west.lease("q", "w", 2, 3_700).is_empty());
    assert!(west.event(&b).blocked);
    west.ack(&w[0], EventAck::Complete, 3_800).unwrap();
    let next = west.lease("q", "w", 2, 3_900);
    assert_eq!(next.iter().map(|e| e.id).collect::<Vec<_>>(), vec![b]);
    east.pull(&west);
    assert_eq!(east.event(&a), west.event(&a));
    assert_eq!(east.event(&b), west.event(&b));
}

#[test]
fn a_stale_copy_from_an_old_handler_cannot_undo_the_new_handlers_dead_letter() {
    let mut east = Dc::new("east", &["east", "west"]);
    let mut west = Dc::new("west", &["east", "west"]);
    let mut r = rule("all", "/in", "q");
    r.retry.max_attempts = 1;
    let ms = completed_at_east(&mut east, &mut west, r, "/in", 1);
    let id = EventId::for_message(&ms[0].id, "all");
    east.lease("q", "e", 1, 2_000);
    west.pull(&east);
    takeover(&mut west, "q", Some("west"), 2_100);
    west.run(Command::ExpireLeases {
        now_ms: 3_500,
        seed: 1,
    })
    .unwrap();
    let w = west.lease("q", "w", 1, 3_600);
    west.ack(
        &w[0],
        EventAck::Fail {
            reason: "bad file".into(),
        },
        3_700,
    )
    .unwrap();
    assert_eq!(west.event(&id).status, EventStatus::Failed);
    // East comes back long after and settles its own lease (not counted:
    // it could not act), making the event due again by its lights.
    east.run(Command::ExpireLeases {
        now_ms: 900_000,
        seed: 2,
    })
    .unwrap();
    assert_eq!(east.event(&id).status, EventStatus::Pending);
    west.pull(&east);
    east.pull(&west);
    for dc in [&east, &west] {
        let e = dc.event(&id);
        assert_eq!((e.status, e.deliveries), (EventStatus::Failed, 2));
    }
}

#[test]
fn a_dc_back_from_an_outage_leases_nothing_until_it_has_heard_from_the_others() {
    let mut east = Dc::new("east", &["east", "west"]);
    let mut west = Dc::new("west", &["east", "west"]);
    let ms = completed_at_east(&mut east, &mut west, rule("all", "/in", "q"), "/in", 2);
    let first = east.lease("q", "e", 1, 2_000);
    assert_eq!(first.len(), 1);
    // East hears from west once more before it goes down (that is no news
    // of what happens while it is down).
    west.put("/in", "w", 2_500);
    east.pull(&west);
    // East is down; west takes the queue over.
    west.pull(&east);
    takeover(&mut west, "q", Some("west"), 10_000);
    // East is back at 100,000: it has heard nothing from west since, so
    // it leases nothing (west may have taken its queues over).
    let lease = |dc: &mut Dc, now_ms: i64| {
        dc.run(Command::LeaseEvents {
            queue: "q".into(),
            consumer: "e".into(),
            max: 10,
            lease_ms: None,
            now_ms,
            seed: 1,
            request: now_ms as u64,
        })
    };
    match lease(&mut east, 100_000) {
        Ok(CommandResult::CatchingUp { dcs, until_ms }) => {
            assert_eq!((dcs.as_str(), until_ms), ("west", 130_000));
        }
        other => panic!("{other:?}"),
    }
    // Once west's feed is read, east knows west handles the queue.
    east.pull(&west);
    assert_eq!(handled_elsewhere(lease(&mut east, 100_100)), "west");
    let _ = ms;

    // With the other DC silent (down too), the hold ends 30 s after the
    // gap: events are not held for ever.
    let mut north = Dc::new("north", &["north", "south"]);
    north.rule(rule("all", "/in", "q"), 10);
    north.put("/in", "m", 100);
    assert!(matches!(
        lease(&mut north, 2_000),
        Ok(CommandResult::Leased { .. })
    ));
    assert!(matches!(
        lease(&mut north, 100_000),
        Ok(CommandResult::CatchingUp { .. })
    ));
    assert!(matches!(
        lease(&mut north, 130_000),
        Ok(CommandResult::Leased { .. })
    ));
}

#[test]
fn a_lease_that_ran_out_while_the_dc_could_not_act_counts_no_attempt() {
    let mut east = Dc::new("east", &["east"]);
    let mut r = rule("all", "/in", "q");
    r.retry.max_attempts = 1;
    east.rule(r, 10);
    east.put("/in", "a", 100);
    east.put("/in", "b", 101);
    // Leases of 1 s from 1,000.
    let got = east.lease("q", "c", 2, 1_000);
    assert_eq!(got.len(), 2);
    // Settled on time, a lease that ran out is a failure (the last one
    // here: dead-lettered).
    let early = Command::ExpireLeases {
        now_ms: 2_500,
        seed: 1,
    };
    let (a, b) = (got[0].id, got[1].id);
    // Only `a`'s lease is settled on time: `b`'s is made to run out later.
    east.run(Command::AckEvent {
        id: b,
        attempt: 1,
        consumer: "c".into(),
        ack: EventAck::Progress {
            lease_ms: Some(60_000),
        },
        now_ms: 1_500,
        seed: 1,
    })
    .unwrap();
    east.run(early).unwrap();
    let ea = east.event(&a);
    assert_eq!((ea.status, ea.failures), (EventStatus::Failed, 1));
    // `b`'s lease ended at 61,500; the DC comes back (or regains its
    // quorum) at 200,000: no failure counted, delivered again at once.
    east.run(Command::ExpireLeases {
        now_ms: 200_000,
        seed: 2,
    })
    .unwrap();
    let eb = east.event(&b);
    assert_eq!(
        (eb.status, eb.failures, eb.deliveries),
        (EventStatus::Pending, 0, 1)
    );
    assert!(eb.attempts[0].error.contains("could not act"), "{eb:?}");
    let again = east.lease("q", "c", 2, 200_001);
    assert_eq!(again.len(), 1);
    assert_eq!((again[0].id, again[0].deliveries), (b, 2));
    // A DC that could act all along but settles a lease late (its
    // housekeeping was slow) counts the failure: a consumer that always
    // hangs on an event cannot keep it from the DLQ.
    east.put("/in", "c", 300_000);
    let c = east.lease("q", "c", 1, 300_000);
    assert_eq!(c.len(), 1);
    for at in [310_000, 320_000, 330_000, 340_000] {
        assert!(east.lease("elsewhere", "c", 1, at).is_empty());
    }
    east.run(Command::ExpireLeases {
        now_ms: 345_000,
        seed: 3,
    })
    .unwrap();
    let ec = east.event(&c[0].id);
    assert_eq!((ec.status, ec.failures), (EventStatus::Failed, 1));
}

#[test]
fn finished_events_are_purged_after_the_retention_and_never_raised_again() {
    let mut east = Dc::new("east", &["east"]);
    east.rule(rule("all", "/in", "q"), 10);
    let ms: Vec<_> = (0..5)
        .map(|i| east.put("/in", &format!("m{i}"), 100 + i))
        .collect();
    let got = east.lease("q", "c", 5, 1_000);
    east.ack(&got[0], EventAck::Complete, 1_100).unwrap();
    east.ack(&got[1], EventAck::Complete, 5_000).unwrap();
    east.ack(
        &got[2],
        EventAck::Fail {
            reason: "no".into(),
        },
        1_100,
    )
    .unwrap();
    // Finished before 2,000: only the first. The dead-lettered one stays,
    // and so do the pending and the leased.
    let purge = |dc: &mut Dc, before_ms| match dc.run(Command::PurgeEvents { before_ms }).unwrap() {
        CommandResult::Expired { count, more } => (count, more),
        other => panic!("{other:?}"),
    };
    assert_eq!(oldest_finished(&east.kv).unwrap(), Some(1_100));
    assert_eq!(purge(&mut east, 2_000), (1, false));
    assert!(get_event(&east.kv, &got[0].id).unwrap().is_none());
    assert_eq!(oldest_finished(&east.kv).unwrap(), Some(5_000));
    assert_eq!(
        purge(&mut east, 2_000),
        (0, false),
        "a retried purge is the same success"
    );
    let c: BTreeMap<_, _> = queue_counts(&east.kv).unwrap().into_iter().collect();
    assert_eq!((c["q"].complete, c["q"].purged, c["q"].failed), (1, 1, 1));
    // A replay forced after completion takes the event out of the
    // retention index; re-evaluating the rule raises nothing for a purged
    // event whose message is still here.
    match east
        .run(Command::ReplayEvents {
            ids: vec![got[1].id],
            force: true,
            now_ms: 6_000,
        })
        .unwrap()
    {
        CommandResult::EventsChanged { changed, .. } => assert_eq!(changed.len(), 1),
        other => panic!("{other:?}"),
    }
    assert_eq!(purge(&mut east, 1_000_000), (0, false));
    assert!(get_event(&east.kv, &got[1].id).is_ok_and(|e| e.is_some()));
    match east
        .run(Command::EvaluateRule {
            name: "all".into(),
            after: None,
            limit: 100,
            now_ms: 7_000,
        })
        .unwrap()
    {
        CommandResult::Evaluated { added, .. } => assert_eq!(added, 0),
        other => panic!("{other:?}"),
    }
    assert_eq!(events_of_message(&east.kv, &ms[0].id).unwrap().len(), 0);
}

#[test]
fn a_dead_letter_leaves_one_notice_in_the_handling_dc_only() {
    let mut east = Dc::new("east", &["east", "west"]);
    let mut west = Dc::new("west", &["east", "west"]);
    let mut r = rule("all", "/in", "q");
    r.error_webhook = Some(mailbox_types::WebhookSink {
        url: "http://127.0.0.1:9/alerts".into(),
        timeout_ms: 1_000,
        secrets: vec!["whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD".into()],
    });
    let mut quiet = rule("quiet", "/in", "q2");
    quiet.retry.max_attempts = 1;
    west.rule(quiet, 9);
    // A second rule whose name starts with the first's: its notices are
    // its own.
    let mut r2 = r.clone();
    r2.name = "all-2".into();
    r2.queue = "q3".into();
    west.rule(r2, 9);
    east.pull(&west);
    completed_at_east(&mut east, &mut west, r, "/in", 2);
    let got = east.lease("q", "c", 10, 2_000);
    let got2 = east.lease("q2", "c", 10, 2_000);
    let got3 = east.lease("q3", "c", 10, 2_000);
    assert_eq!((got.len(), got2.len(), got3.len()), (2, 2, 2));
    east.ack(
        &got3[1],
        EventAck::Fail {
            reason: "no".into(),
        },
        1_900,
    )
    .unwrap();
    east.ack(
        &got[0],
        EventAck::Fail {
            reason: "no".into(),
        },
        2_100,
    )
    .unwrap();
    // A rule without an error webhook leaves no notice.
    east.ack(
        &got2[0],
        EventAck::Fail {
            reason: "no".into(),
        },
        2_100,
    )
    .unwrap();
    assert_eq!(notice_rules(&east.kv).unwrap(), vec!["all", "all-2"]);
    let n = notices(&east.kv, "all", 100).unwrap();
    assert_eq!(n, vec![(2_100, got[0].id)]);
    assert_eq!(
        notices(&east.kv, "all-2", 100).unwrap(),
        vec![(1_900, got3[1].id)]
    );
    // Sealing takes the notices out of the outbox and keeps the body; a
    // second seal of them (another leader) changes nothing.
    let n2 = notices(&east.kv, "all-2", 100).unwrap();
    let seal = |id: &str| Command::SealNotices {
        rule: "all-2".into(),
        id: id.into(),
        body: b"{}".to_vec(),
        notices: n2.clone(),
    };
    let sealed = |r: CommandResponse| match r.unwrap() {
        CommandResult::Expired { count, .. } => count,
        other => panic!("{other:?}"),
    };
    assert_eq!(sealed(east.run(seal("dlq_1"))), 1);
    assert_eq!(sealed(east.run(seal("dlq_2"))), 0);
    assert!(notices(&east.kv, "all-2", 100).unwrap().is_empty());
    let waiting = sealed_notifications(&east.kv, "all-2", 10).unwrap();
    assert_eq!(waiting.len(), 1);
    assert_eq!((waiting[0].0.as_str(), waiting[0].1.count), ("dlq_1", 1));
    assert_eq!(notice_rules(&east.kv).unwrap(), vec!["all", "all-2"]);
    east.run(Command::ClearSealed {
        rule: "all-2".into(),
        id: "dlq_1".into(),
    })
    .unwrap();
    assert!(sealed_notifications(&east.kv, "all-2", 10)
        .unwrap()
        .is_empty());
    // Replaying and failing again: a new notice; the copy in west: none.
    west.pull(&east);
    assert!(notice_rules(&west.kv).unwrap().is_empty());
    let clear = |notices: Vec<(i64, EventId)>| Command::ClearNotices {
        rule: "all".into(),
        notices,
    };
    east.run(clear(n.clone())).unwrap();
    east.run(clear(n)).unwrap();
    assert!(notices(&east.kv, "all", 100).unwrap().is_empty());
    assert!(notice_rules(&east.kv).unwrap().is_empty());
    east.run(Command::ReplayEvents {
        ids: vec![got[0].id],
        force: false,
        now_ms: 3_000,
    })
    .unwrap();
    let again = east.lease("q", "c", 10, 3_100);
    let again = again.iter().find(|e| e.id == got[0].id).unwrap();
    east.ack(
        again,
        EventAck::Fail {
            reason: "still no".into(),
        },
        3_200,
    )
    .unwrap();
    assert_eq!(
        notices(&east.kv, "all", 100).unwrap(),
        vec![(3_200, got[0].id)]
    );
}

#[test]
fn the_new_owner_tells_a_third_dc_what_the_dead_one_told_only_it() {
    let dcs = ["east", "west", "north"];
    let mut east = Dc::new("east", &dcs);
    let mut west = Dc::new("west", &dcs);
    let mut north = Dc::new("north", &dcs);
    east.rule(rule("all", "/in", "q"), 10);
    let ms: Vec<_> = (0..3)
        .map(|i| east.put("/in", &format!("m{i}"), 100 + i))
        .collect();
    for _ in 0..2 {
        west.pull(&east);
        north.pull(&east);
        east.pull(&west);
        east.pull(&north);
    }
    west.pull(&east);
    north.pull(&east);
    let got = east.lease("q", "c", 10, 2_000);
    assert_eq!(got.len(), 3);
    for e in &got {
        east.ack(e, EventAck::Complete, 2_100).unwrap();
    }
    // Only west heard of the completions before east died.
    west.pull(&east);
    let id = EventId::for_message(&ms[0].id, "all");
    assert_eq!(north.event(&id).status, EventStatus::Pending);
    takeover(&mut west, "q", Some("west"), 3_000);
    announce_all(&mut west, "q");
    assert!(announcements_due(&west.kv).unwrap().is_empty());
    north.pull(&west);
    for m in &ms {
        let id = EventId::for_message(&m.id, "all");
        assert_eq!(north.event(&id).status, EventStatus::Complete);
        assert_eq!(north.event(&id), west.event(&id));
    }
    // Handed on to north later: nothing completed is delivered again.
    takeover(&mut north, "q", Some("north"), 4_000);
    assert!(north.lease("q", "n", 10, 100_000).is_empty());
}

/// Runs `dc`'s re-announcement pages to the end.
fn announce_all(dc: &mut Dc, queue: &str) {
    loop {
        match dc
            .run(Command::AnnounceQueue {
                queue: queue.into(),
            })
            .unwrap()
        {
            CommandResult::Expired { more: true, .. } => {}
            _ => return,
        }
    }
}

#[test]
fn a_dead_letter_by_an_old_handler_does_not_outrank_a_completion() {
    let mut east = Dc::new("east", &["east", "west"]);
    let mut west = Dc::new("west", &["east", "west"]);
    let mut r = rule("all", "/in", "q");
    r.retry.max_attempts = 1;
    let ms = completed_at_east(&mut east, &mut west, r, "/in", 1);
    let id = EventId::for_message(&ms[0].id, "all");
    takeover(&mut west, "q", Some("west"), 2_000);
    let w = west.lease("q", "w", 1, 2_100);
    west.ack(&w[0], EventAck::Complete, 2_200).unwrap();
    // East, cut off and with its clock far ahead, lets its own lease run
    // out on the last attempt: dead-lettered there, with a newer stamp.
    east.lease("q", "e", 1, 900_000);
    east.run(Command::ExpireLeases {
        now_ms: 902_000,
        seed: 1,
    })
    .unwrap();
    assert_eq!(east.event(&id).status, EventStatus::Failed);
    east.pull(&west);
    west.pull(&east);
    for dc in [&east, &west] {
        assert_eq!(dc.event(&id).status, EventStatus::Complete);
    }
}

#[test]
fn a_takeover_ordered_from_a_third_dc_still_tells_the_new_owner_everything() {
    let dcs = ["east", "west", "north"];
    let mut east = Dc::new("east", &dcs);
    let mut west = Dc::new("west", &dcs);
    let mut north = Dc::new("north", &dcs);
    east.rule(rule("all", "/in", "q"), 10);
    let m = east.put("/in", "m", 100);
    for _ in 0..2 {
        west.pull(&east);
        north.pull(&east);
        east.pull(&west);
        east.pull(&north);
    }
    west.pull(&east);
    north.pull(&east);
    let id = EventId::for_message(&m.id, "all");
    let got = east.lease("q", "c", 1, 2_000);
    east.ack(&got[0], EventAck::Complete, 2_100).unwrap();
    // Only north heard of the completion; the admin, at north, hands the
    // queue to west.
    north.pull(&east);
    takeover(&mut north, "q", Some("west"), 3_000);
    announce_all(&mut north, "q");
    west.pull(&north);
    assert_eq!(
        queue_handler(&west.kv, "q").unwrap().as_deref(),
        Some("west")
    );
    assert_eq!(west.event(&id).status, EventStatus::Complete);
    assert!(
        west.lease("q", "w", 10, 100_000).is_empty(),
        "nothing delivered again"
    );
    // West announces too (it applied a new owner), and a retried takeover
    // proposal changes nothing.
    assert_eq!(announcements_due(&west.kv).unwrap(), vec!["q".to_string()]);
    let before = crate::replication::feed_since(&north.kv, 0, 100_000)
        .unwrap()
        .len();
    takeover(&mut north, "q", Some("west"), 3_000);
    assert_eq!(
        crate::replication::feed_since(&north.kv, 0, 100_000)
            .unwrap()
            .len(),
        before
    );
}

#[test]
fn a_due_position_is_just_after_its_predecessor() {
    let id = |last: &[u8]| {
        let mut b = [0u8; 16];
        b[16 - last.len()..].copy_from_slice(last);
        b
    };
    assert_eq!(before_pos((5, id(&[1]))), (5, id(&[0])));
    assert_eq!(before_pos((5, id(&[1, 0, 0]))), (5, id(&[0, 0xff, 0xff])));
    assert_eq!(before_pos((5, [0; 16])), (4, [0xff; 16]));
    assert_eq!(before_pos((0, [0; 16])), (0, [0; 16]), "the head");
    // In key order: nothing lies between a position and its predecessor.
    let p = (7, id(&[2, 0]));
    let q = before_pos(p);
    assert!(q < p);
    assert!(due_floor_key("q", "east", q) < due_floor_key("q", "east", p));
}

/// A lease request at `now_ms` (the hold tests look at the raw answer).
fn lease_raw(dc: &mut Dc, now_ms: i64) -> CommandResponse {
    dc.run(Command::LeaseEvents {
        queue: "q".into(),
        consumer: "e".into(),
        max: 10,
        lease_ms: None,
        now_ms,
        seed: 1,
        request: now_ms as u64,
    })
}

#[test]
fn a_dc_back_from_an_outage_waits_for_the_takeover_deep_in_a_backlog() {
    let mut east = Dc::new("east", &["east", "west"]);
    let mut west = Dc::new("west", &["east", "west"]);
    completed_at_east(&mut east, &mut west, rule("all", "/in", "q"), "/in", 2);
    assert_eq!(east.lease("q", "e", 1, 2_000).len(), 1);
    east.pull(&west);
    // East is down. West takes 50 uploads, then the queue over: the
    // takeover sits behind them in west's feed.
    west.pull(&east);
    for i in 0..50 {
        west.put("/in", &format!("w{i}"), 3_000 + i);
    }
    takeover(&mut west, "q", Some("west"), 10_000);
    // East is back at 100,000 (its housekeeping notes the gap) and reads
    // a first batch of west's backlog: not yet the takeover, so it still
    // holds.
    east.run(Command::ExpireLeases {
        now_ms: 100_000,
        seed: 1,
    })
    .unwrap();
    assert_eq!(east.pull_at(&west, 10, 100_050), 10);
    match lease_raw(&mut east, 100_100) {
        Ok(CommandResult::CatchingUp { dcs, .. }) => assert_eq!(dcs, "west"),
        other => panic!("east leased before reading the takeover: {other:?}"),
    }
    // The rest of it, up to the head west reported: the takeover is read.
    east.pull_at(&west, 1000, 100_200);
    assert_eq!(handled_elsewhere(lease_raw(&mut east, 100_300)), "west");
}

#[test]
fn a_keepalive_from_an_idle_peer_ends_the_hold() {
    let mut east = Dc::new("east", &["east", "west"]);
    let mut west = Dc::new("west", &["east", "west"]);
    completed_at_east(&mut east, &mut west, rule("all", "/in", "q"), "/in", 2);
    assert_eq!(east.lease("q", "e", 1, 2_000).len(), 1);
    east.pull(&west);
    // East is down for a while; west, idle, writes nothing.
    match lease_raw(&mut east, 100_000) {
        Ok(CommandResult::CatchingUp { .. }) => {}
        other => panic!("{other:?}"),
    }
    // A keep-alive (no records, west's head already applied) received
    // since east came back: west has nothing east has not read.
    assert_eq!(east.pull_at(&west, 1000, 100_100), 0);
    assert!(matches!(
        lease_raw(&mut east, 100_200),
        Ok(CommandResult::Leased { .. })
    ));
}

#[test]
fn a_takeover_from_a_dc_heard_from_lately_needs_force() {
    let mut east = Dc::new("east", &["east", "west", "north"]);
    let mut west = Dc::new("west", &["east", "west", "north"]);
    completed_at_east(&mut east, &mut west, rule("all", "/in", "q"), "/in", 2);
    // West last heard from east at 5,000 (a keep-alive counts).
    west.pull_at(&east, 1000, 5_000);
    // 20 s later east may well be up and delivering: refused, and nothing
    // is written (`Dc::run` checks).
    match try_takeover(&mut west, "q", Some("west"), 25_000, false) {
        Err(StateError::HandlerHeard {
            dcs,
            ago_s,
            silence_s,
            ..
        }) => assert_eq!((dcs.as_str(), ago_s, silence_s), ("east", 20, 60)),
        other => panic!("{other:?}"),
    }
    // North, never heard from, is no reason to refuse; east silent for
    // 60 s is none either.
    try_takeover(&mut west, "q", Some("west"), 65_000, false).unwrap();
    // Handing it on from west (this DC, exempt) to north, heard from just
    // now, is refused; forced, it goes through.
    let north = Dc::new("north", &["east", "west", "north"]);
    west.pull_at(&north, 1000, 66_000);
    assert!(matches!(
        try_takeover(&mut west, "q", Some("north"), 66_500, false),
        Ok(CommandResult::None)
    ));
    match try_takeover(&mut west, "q", Some("west"), 67_000, false) {
        Err(StateError::HandlerHeard { dcs, .. }) => assert_eq!(dcs, "north"),
        other => panic!("{other:?}"),
    }
    try_takeover(&mut west, "q", Some("west"), 67_000, true).unwrap();
    assert_eq!(
        queue_owners(&west.kv).unwrap()[0].1.dc.as_deref(),
        Some("west")
    );
}

#[test]
fn a_takeover_checks_the_lanes_when_the_owner_left_the_cluster() {
    let mut east = Dc::new("east", &["east", "west", "north"]);
    let mut west = Dc::new("west", &["east", "west", "north"]);
    completed_at_east(&mut east, &mut west, rule("all", "/in", "q"), "/in", 1);
    takeover(&mut west, "q", Some("north"), 2_000);
    // North leaves the cluster: each lane's DC handles its own events
    // again, east among them, heard from just now.
    west.run(Command::SetClusterDcs {
        dcs: vec!["east".into(), "west".into()],
    })
    .unwrap();
    west.pull_at(&east, 1000, 10_000);
    match try_takeover(&mut west, "q", Some("west"), 12_000, false) {
        Err(StateError::HandlerHeard { dcs, .. }) => assert_eq!(dcs, "east"),
        other => panic!("handed away from east, which delivers: {other:?}"),
    }
}
