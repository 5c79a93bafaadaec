//! Replication-complete events against real processes (invariant 4): no
//! event while a DC is cut off, exactly one per rule and message after it
//! heals; consumers share a queue; a consumer that dies mid-lease gets its
//! event delivered again after the lease (same id, attempt + 1), also
//! across a leader kill; `progress` keeps a long job's lease; the CLI's
//! rule, lease, answer and dead-letter commands work as a user runs them.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command as Proc;
use std::time::{Duration, Instant};

use mailbox_client::{Client, PutOptions};
use mailbox_proto::v1 as pb;
use mailbox_testkit::{mailbox_cli_bin, wait_for, DcOptions, PatternReader, TestCluster, TestDc};
use tokio_stream::StreamExt;

fn rule(name: &str, queue: &str, lease_ms: u64) -> pb::RuleInfo {
    pb::RuleInfo {
        name: name.into(),
        enabled: true,
        mailbox: "/inbox".into(),
        queue: queue.into(),
        max_attempts: 5,
        initial_backoff_ms: 100,
        max_backoff_ms: 200,
        lease_ms,
        ordering: "none".into(),
        ..Default::default()
    }
}

async fn put(c: &Client, name: &str, seed: u64) -> anyhow::Result<String> {
    let r = c
        .put(
            PutOptions {
                mailbox: "/inbox".into(),
                name: name.into(),
                ..Default::default()
            },
            PatternReader::new(seed, 1000),
            |_| {},
        )
        .await?;
    Ok(r.message.expect("message").id)
}

async fn queue(c: &Client, q: &str) -> anyhow::Result<pb::QueueStats> {
    let all = c
        .events()
        .queue_stats(pb::QueueStatsRequest {})
        .await?
        .into_inner()
        .queues;
    Ok(all
        .into_iter()
        .find(|s| s.queue == q)
        .unwrap_or(pb::QueueStats {
            queue: q.into(),
            ..Default::default()
        }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_event_while_a_dc_is_cut_off_then_exactly_one_each_shared_by_consumers(
) -> anyhow::Result<()> {
    let opts = DcOptions {
        nodes: 1,
        ..Default::default()
    };
    let mut cl = TestCluster::start(&["east", "west"], opts, "").await?;
    let t = Duration::from_secs(30);
    cl.dc("east").wait_leader(t).await?;
    cl.dc("west").wait_leader(t).await?;
    let east = cl.dc("east").client().await?;
    let west = cl.dc("west").client().await?;
    east.mkdir("/inbox", true).await?;
    east.events()
        .put_rule(pb::PutRuleRequest {
            rule: Some(rule("arrivals", "q", 5_000)),
        })
        .await?;
    // Rules are cluster configuration: west learns it through the feed.
    wait_for(t, "the rule in west", || async {
        let r = west
            .events()
            .list_rules(pb::ListRulesRequest {})
            .await
            .ok()?;
        (r.into_inner().rules.len() == 1).then_some(())
    })
    .await?;

    cl.cut("east", "west");
    let mut ids = BTreeSet::new();
    for i in 0..6 {
        ids.insert(put(&east, &format!("f{i}"), i).await?);
    }
    // East knows west is unreachable; nothing may fire before west holds
    // the files, and each file says it waits for replication.
    wait_for(t, "east to see west disconnected", || async {
        let s = east.replication_status().await.ok()?;
        s.remotes
            .iter()
            .any(|r| r.dc == "west" && r.state != "connected")
            .then_some(())
    })
    .await?;
    for id in &ids {
        let r = east
            .events()
            .list_events(pb::ListEventsRequest {
                message_id: id.clone(),
                ..Default::default()
            })
            .await?
            .into_inner();
        assert!(
            r.events.is_empty(),
            "an event for {id} before west holds it"
        );
        assert_eq!(r.pending_replication_rules, ["arrivals"]);
    }
    assert_eq!(queue(&east, "q").await?.raised, 0);

    cl.heal("east", "west");
    wait_for(t, "6 events after healing", || async {
        let s = queue(&east, "q").await.ok()?;
        (s.raised == 6).then_some(())
    })
    .await?;

    // Two consumers share the queue; each event goes to one of them.
    let mut streams = Vec::new();
    for name in ["c1", "c2"] {
        let s = east
            .events()
            .subscribe(pb::SubscribeRequest {
                queue: "q".into(),
                consumer: name.into(),
                max_in_flight: 2,
                lease_ms: 0,
            })
            .await?
            .into_inner();
        streams.push((name, s));
    }
    let mut seen: BTreeMap<String, (String, u32)> = BTreeMap::new();
    let deadline = Instant::now() + t;
    let mut by_consumer: BTreeMap<&str, usize> = BTreeMap::new();
    while seen.len() < 6 {
        anyhow::ensure!(
            Instant::now() < deadline,
            "only {} events delivered",
            seen.len()
        );
        for (name, s) in streams.iter_mut() {
            let Ok(Some(e)) = tokio::time::timeout(Duration::from_millis(200), s.next()).await
            else {
                continue;
            };
            let e = e?;
            assert_eq!(e.attempt, 1, "first delivery");
            let msg = e.message.clone().expect("message");
            assert!(ids.contains(&msg.id));
            assert!(
                seen.insert(e.id.clone(), (msg.id, e.attempt)).is_none(),
                "event {} delivered twice",
                e.id
            );
            *by_consumer.entry(name).or_default() += 1;
            east.events()
                .ack(pb::AckRequest {
                    id: e.id,
                    attempt: e.attempt,
                    consumer: name.to_string(),
                    outcome: "complete".into(),
                    ..Default::default()
                })
                .await?;
        }
    }
    let messages: BTreeSet<_> = seen.values().map(|(m, _)| m.clone()).collect();
    assert_eq!(messages, ids, "one event per message");
    assert!(
        by_consumer.len() == 2,
        "both consumers got work: {by_consumer:?}"
    );
    let s = wait_for(t, "all complete", || async {
        let s = queue(&east, "q").await.ok()?;
        (s.complete == 6).then_some(s)
    })
    .await?;
    assert_eq!((s.pending, s.processing, s.failed), (0, 0, 0));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_consumer_killed_mid_lease_gets_the_event_again_after_the_lease_even_across_a_leader_kill(
) -> anyhow::Result<()> {
    let mut dc = TestDc::start(DcOptions {
        nodes: 3,
        ..Default::default()
    })
    .await?;
    let t = Duration::from_secs(30);
    let leader = dc.wait_leader(t).await?;
    let c = dc.client().await?;
    c.mkdir("/inbox", true).await?;
    c.events()
        .put_rule(pb::PutRuleRequest {
            rule: Some(rule("r", "work", 2_000)),
        })
        .await?;
    let msg = put(&c, "job.csv", 7).await?;

    // Consumer A leases it and dies (never answers).
    let leased_at = Instant::now();
    let first = wait_for(t, "the event", || async {
        let r = c
            .events()
            .lease(pb::LeaseRequest {
                queue: "work".into(),
                consumer: "a".into(),
                max: 1,
                lease_ms: 0,
                wait_ms: 1_000,
            })
            .await
            .ok()?;
        r.into_inner().events.into_iter().next()
    })
    .await?;
    assert_eq!(first.attempt, 1);
    assert_eq!(first.message.as_ref().unwrap().id, msg);
    // The lease is in the log: killing the leader loses nothing.
    dc.kill(leader);
    dc.wait_leader(t).await?;
    let c = dc.client().await?;
    let mut sub = c
        .events()
        .subscribe(pb::SubscribeRequest {
            queue: "work".into(),
            consumer: "b".into(),
            max_in_flight: 4,
            lease_ms: 0,
        })
        .await?
        .into_inner();
    let second = tokio::time::timeout(t, sub.next())
        .await?
        .expect("stream open")?;
    assert!(
        leased_at.elapsed() >= Duration::from_millis(2_000),
        "delivered again after {:?}, before the 2 s lease ran out",
        leased_at.elapsed()
    );
    assert_eq!(second.id, first.id, "same id");
    assert_eq!(second.attempt, 2, "attempt + 1");
    assert_eq!(second.attempts[0].outcome, "expired");
    // A late answer for the first delivery is refused; the event stays B's.
    let late = c
        .events()
        .ack(pb::AckRequest {
            id: first.id.clone(),
            attempt: 1,
            consumer: "a".into(),
            outcome: "retry".into(),
            ..Default::default()
        })
        .await;
    assert_eq!(late.unwrap_err().code(), tonic::Code::FailedPrecondition);

    // B works for three lease lengths, reporting progress.
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(6_000) {
        c.events()
            .ack(pb::AckRequest {
                id: second.id.clone(),
                attempt: 2,
                consumer: "b".into(),
                outcome: "progress".into(),
                ..Default::default()
            })
            .await?;
        let next = tokio::time::timeout(Duration::from_millis(700), sub.next()).await;
        assert!(
            next.is_err(),
            "delivered again while its lease was kept: {next:?}"
        );
    }
    let done = c
        .events()
        .ack(pb::AckRequest {
            id: second.id.clone(),
            attempt: 2,
            consumer: "b".into(),
            outcome: "complete".into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(done.status, "complete");
    assert_eq!((done.attempt, done.failures), (2, 1));
    Ok(())
}

fn cli(dc: &TestDc, args: &[&str]) -> anyhow::Result<(bool, String, String)> {
    let mut cmd = Proc::new(mailbox_cli_bin()?);
    for ep in dc.endpoints() {
        cmd.arg("--endpoint").arg(ep);
    }
    let out = cmd.args(args).output()?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {s}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_manages_rules_answers_events_and_replays_the_dead_letter_queue(
) -> anyhow::Result<()> {
    let mut dc = TestDc::start(DcOptions {
        nodes: 1,
        ..Default::default()
    })
    .await?;
    dc.wait_leader(Duration::from_secs(30)).await?;
    let c = dc.client().await?;
    c.mkdir("/inbox", true).await?;

    // A bad pattern is refused with a clear error, and nothing is stored.
    let (ok, _, err) = cli(
        &dc,
        &[
            "rules",
            "add",
            "edi",
            "--mailbox",
            "/inbox",
            "--queue",
            "q",
            "--include",
            "[abc",
        ],
    )?;
    assert!(!ok);
    assert!(err.contains("never closed"), "{err}");
    let (ok, out, _) = cli(&dc, &["--json", "rules", "ls"])?;
    assert!(ok);
    assert_eq!(json(&out).as_array().unwrap().len(), 0);

    let (ok, out, err) = cli(
        &dc,
        &[
            "--json",
            "rules",
            "add",
            "edi",
            "--mailbox",
            "/inbox",
            "--queue",
            "q",
            "--include",
            "*.edi",
            "--max-attempts",
            "2",
            "--backoff",
            "100ms..200ms",
            "--lease",
            "5s",
        ],
    )?;
    assert!(ok, "{err}");
    assert_eq!(json(&out)["queue"], "q");
    let skipped = put(&c, "notes.txt", 1).await?;
    let msg = put(&c, "order.edi", 2).await?;

    let ev = wait_for(Duration::from_secs(10), "an event to lease", || async {
        let (ok, out, _) = cli(&dc, &["--json", "events", "next", "q", "--wait", "2s"]).ok()?;
        let v = json(&out);
        (ok && v.as_array()?.len() == 1).then(|| v[0].clone())
    })
    .await?;
    assert_eq!(ev["message"]["id"], msg.as_str());
    assert_eq!(ev["attempt"], 1);
    let id = ev["id"].as_str().unwrap().to_string();
    let (ok, out, _) = cli(&dc, &["--json", "events", "ls", "--message", &skipped])?;
    assert!(ok);
    assert_eq!(
        json(&out).as_array().unwrap().len(),
        0,
        "notes.txt is not *.edi"
    );

    // A permanent failure dead-letters at once, with its reason.
    let (ok, _, err) = cli(
        &dc,
        &["events", "ack", &id, "fail", "--reason", "bad envelope"],
    )?;
    assert!(ok, "{err}");
    let (ok, out, _) = cli(&dc, &["--json", "dlq", "ls", "--queue", "q"])?;
    assert!(ok);
    let dlq = json(&out);
    assert_eq!(dlq.as_array().unwrap().len(), 1);
    assert_eq!(dlq[0]["attempts"][0]["error"], "bad envelope");
    // The dead letter shows in /metrics: a counter and a gauge per queue.
    let m = dc.scrape(1).await?;
    assert_eq!(
        m.get("mailbox_events_dead_lettered_total", &[("queue", "q")]),
        Some(1.0)
    );
    assert_eq!(
        m.get(
            "mailbox_event_queue_events",
            &[("queue", "q"), ("status", "failed")]
        ),
        Some(1.0)
    );
    assert_eq!(
        m.get("mailbox_events_raised_total", &[("queue", "q")]),
        Some(1.0)
    );
    let (_, out, _) = cli(&dc, &["--json", "dlq", "ls", "--error", "nothing like it"])?;
    assert_eq!(json(&out).as_array().unwrap().len(), 0);

    // Replay: the same id again, attempt 2.
    let (ok, _, err) = cli(&dc, &["dlq", "replay", &id])?;
    assert!(ok, "{err}");
    let (ok, out, _) = cli(&dc, &["--json", "events", "next", "q", "--wait", "5s"])?;
    assert!(ok);
    let again = &json(&out)[0];
    assert_eq!(again["id"], id.as_str());
    assert_eq!(again["attempt"], 2);
    let (ok, _, err) = cli(&dc, &["events", "ack", &id, "complete"])?;
    assert!(ok, "{err}");
    // Replaying a complete event needs --force, and says so.
    let (ok, _, err) = cli(&dc, &["dlq", "replay", &id])?;
    assert!(!ok);
    assert!(err.contains("--force"), "{err}");
    let (ok, _, err) = cli(&dc, &["dlq", "replay", &id, "--force"])?;
    assert!(ok, "{err}");

    // `stat` shows each rule's event.
    let (ok, out, _) = cli(&dc, &["--json", "stat", &msg])?;
    assert!(ok);
    let v = json(&out);
    assert_eq!(v["events"][0]["id"], id.as_str());
    assert_eq!(v["events"][0]["status"], "pending");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_a_dc_suspended_events_fire_without_it_and_not_again_when_it_returns(
) -> anyhow::Result<()> {
    let opts = DcOptions {
        nodes: 1,
        ..Default::default()
    };
    let mut cl = TestCluster::start(&["east", "west"], opts, "").await?;
    let t = Duration::from_secs(30);
    cl.dc("east").wait_leader(t).await?;
    cl.dc("west").wait_leader(t).await?;
    let east = cl.dc("east").client().await?;
    let west = cl.dc("west").client().await?;
    east.mkdir("/inbox", true).await?;
    east.events()
        .put_rule(pb::PutRuleRequest {
            rule: Some(rule("arrivals", "q", 5_000)),
        })
        .await?;
    cl.cut("east", "west");
    let mut ids = BTreeSet::new();
    for i in 0..4 {
        ids.insert(put(&east, &format!("f{i}"), i).await?);
    }
    assert_eq!(queue(&east, "q").await?.raised, 0);

    // West is down for long: the admin suspends it (through the CLI).
    let (ok, out, err) = cli(
        cl.dc("east"),
        &[
            "--json",
            "dc",
            "suspend",
            "west",
            "--reason",
            "west DC power work",
        ],
    )?;
    assert!(ok, "{err}");
    let dcs = json(&out);
    let w = dcs
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["dc"] == "west")
        .unwrap();
    assert_eq!(w["suspended"], true);
    assert_eq!(w["reason"], "west DC power work");
    // What waited only for west fires now, marked so; new uploads too.
    ids.insert(put(&east, "during", 9).await?);
    let events = wait_for(t, "5 events without west", || async {
        let r = east
            .events()
            .list_events(pb::ListEventsRequest {
                queue: "q".into(),
                ..Default::default()
            })
            .await
            .ok()?
            .into_inner();
        (r.events.len() == 5).then_some(r.events)
    })
    .await?;
    for e in &events {
        assert_eq!(e.without, ["west"]);
        assert!(ids.contains(&e.message.as_ref().unwrap().id));
    }

    // West returns and catches up; its holds raise nothing more.
    cl.heal("east", "west");
    wait_for(t, "west to hold all five", || async {
        let l = west.list_all("/inbox").await.ok()?;
        (l.len() == 5).then_some(())
    })
    .await?;
    wait_for(t, "east to learn west holds them", || async {
        for id in &ids {
            let m = east.stat_local(id).await.ok()?;
            m.replicas.iter().find(|r| r.dc == "west")?;
        }
        Some(())
    })
    .await?;
    assert_eq!(queue(&east, "q").await?.raised, 5);
    // West learned of the suspension too (cluster configuration).
    let (ok, out, _) = cli(cl.dc("west"), &["--json", "dc", "ls"])?;
    assert!(ok);
    let w = json(&out)
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["dc"] == "west")
        .cloned()
        .unwrap();
    assert_eq!(w["suspended"], true);
    let (ok, _, err) = cli(cl.dc("east"), &["dc", "resume", "west"])?;
    assert!(ok, "{err}");
    let (_, out, _) = cli(cl.dc("east"), &["--json", "dc", "ls"])?;
    assert!(json(&out)
        .as_array()
        .unwrap()
        .iter()
        .all(|d| d["suspended"] == false));
    Ok(())
}

/// A webhook receiver: answers `first` for the first `n` requests, then
/// `then`; keeps every request.
struct Receiver {
    first: (u16, usize),
    then: u16,
    seen: std::sync::Mutex<Vec<(axum::http::HeaderMap, bytes::Bytes)>>,
}

async fn start_receiver(r: std::sync::Arc<Receiver>) -> anyhow::Result<String> {
    use axum::extract::State;
    use axum::http::{HeaderMap, StatusCode};
    async fn hook(
        State(r): State<std::sync::Arc<Receiver>>,
        headers: HeaderMap,
        body: bytes::Bytes,
    ) -> (StatusCode, [(&'static str, &'static str); 1]) {
        let n = {
            let mut seen = r.seen.lock().unwrap();
            seen.push((headers, body));
            seen.len()
        };
        let code = if n <= r.first.1 { r.first.0 } else { r.then };
        (StatusCode::from_u16(code).unwrap(), [("retry-after", "0")])
    }
    let app = axum::Router::new()
        .route("/hook", axum::routing::post(hook))
        .with_state(r);
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    tokio::spawn(async move { axum::serve(l, app).await });
    Ok(format!("http://{addr}/hook"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn webhooks_deliver_everything_after_a_receiver_outage_signed_and_a_400_dead_letters(
) -> anyhow::Result<()> {
    let mut dc = TestDc::start(DcOptions {
        nodes: 1,
        ..Default::default()
    })
    .await?;
    let t = Duration::from_secs(30);
    dc.wait_leader(t).await?;
    let c = dc.client().await?;
    c.mkdir("/inbox", true).await?;
    c.mkdir("/bad", true).await?;
    let secret = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD".to_string();
    // Down (503) for its first 8 requests, then fine: as many failures as
    // the 4 events' whole budgets (2 attempts each) allow, so only
    // the circuit breaker (deferrals cost no attempt) keeps them out of
    // the dead-letter queue.
    let flaky = std::sync::Arc::new(Receiver {
        first: (503, 8),
        then: 200,
        seen: Default::default(),
    });
    let rejecting = std::sync::Arc::new(Receiver {
        first: (400, usize::MAX),
        then: 400,
        seen: Default::default(),
    });
    let mut hooked = rule("hooked", "hookq", 5_000);
    hooked.max_attempts = 2;
    hooked.webhook_url = start_receiver(flaky.clone()).await?;
    hooked.webhook_secrets = vec![secret.clone()];
    c.events()
        .put_rule(pb::PutRuleRequest { rule: Some(hooked) })
        .await?;
    let mut bad = rule("bad", "badq", 5_000);
    bad.mailbox = "/bad".into();
    bad.webhook_url = start_receiver(rejecting.clone()).await?;
    bad.webhook_secrets = vec![secret.clone()];
    c.events()
        .put_rule(pb::PutRuleRequest { rule: Some(bad) })
        .await?;
    // A second rule on a webhook's queue is refused.
    let clash = c
        .events()
        .put_rule(pb::PutRuleRequest {
            rule: Some(rule("clash", "hookq", 5_000)),
        })
        .await;
    assert_eq!(clash.unwrap_err().code(), tonic::Code::InvalidArgument);
    // Listings never show the secret.
    let listed = c
        .events()
        .list_rules(pb::ListRulesRequest {})
        .await?
        .into_inner();
    assert!(listed
        .rules
        .iter()
        .all(|r| r.webhook_secrets.is_empty() && r.webhook_secret_count == 1));

    let mut ids = BTreeSet::new();
    for i in 0..4 {
        ids.insert(put(&c, &format!("f{i}"), i).await?);
    }
    let bad_msg = c
        .put(
            PutOptions {
                mailbox: "/bad".into(),
                name: "x".into(),
                ..Default::default()
            },
            PatternReader::new(1, 10),
            |_| {},
        )
        .await?
        .message
        .unwrap()
        .id;
    let s = wait_for(t, "4 webhook events complete", || async {
        let s = queue(&c, "hookq").await.ok()?;
        (s.complete == 4).then_some(s)
    })
    .await?;
    assert_eq!(s.failed, 0, "nothing in the dead-letter queue");
    let seen = flaky.seen.lock().unwrap().clone();
    assert!(
        seen.len() >= 12,
        "8 refusals and 4 deliveries: {}",
        seen.len()
    );
    let mut delivered = BTreeSet::new();
    for (i, (h, body)) in seen.iter().enumerate() {
        let id = h["webhook-id"].to_str()?;
        let ts: i64 = h["webhook-timestamp"].to_str()?.parse()?;
        let want = mailbox_events::webhook::signature(std::slice::from_ref(&secret), id, ts, body)
            .map_err(anyhow::Error::msg)?;
        assert_eq!(
            h["webhook-signature"].to_str()?,
            want,
            "signature of request {i}"
        );
        let v = json(std::str::from_utf8(body)?);
        assert_eq!(v["event_id"], id);
        assert!(ids.contains(v["message"]["id"].as_str().unwrap()));
        if i >= 8 {
            assert!(
                delivered.insert(v["message"]["id"].as_str().unwrap().to_string()),
                "delivered twice after success"
            );
        }
    }
    assert_eq!(delivered, ids, "every file's event delivered");

    // 400 is permanent: dead-lettered at once, after one request.
    let dead = wait_for(t, "the 400 event in the DLQ", || async {
        let r = c
            .events()
            .list_events(pb::ListEventsRequest {
                queue: "badq".into(),
                status: "failed".into(),
                ..Default::default()
            })
            .await
            .ok()?
            .into_inner();
        r.events.into_iter().next()
    })
    .await?;
    assert_eq!(dead.message.as_ref().unwrap().id, bad_msg);
    assert_eq!(dead.attempts.len(), 1);
    assert!(
        dead.attempts[0].error.contains("HTTP 400"),
        "{:?}",
        dead.attempts
    );
    assert_eq!(rejecting.seen.lock().unwrap().len(), 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scripts_long_poll_and_answer_events_over_http() -> anyhow::Result<()> {
    use mailbox_testkit::http_request_as;
    let mut dc = TestDc::start(DcOptions {
        nodes: 1,
        ..Default::default()
    })
    .await?;
    dc.wait_leader(Duration::from_secs(30)).await?;
    let c = dc.client().await?;
    c.mkdir("/inbox", true).await?;
    c.events()
        .put_rule(pb::PutRuleRequest {
            rule: Some(rule("r", "scripts", 30_000)),
        })
        .await?;
    let http = dc.nodes[0].http_addr.clone();
    let long = Duration::from_secs(30);
    // Scripts log in: a user who may download from /inbox, with a token.
    let acc = c.accounts();
    let mut acc2 = acc.clone();
    acc2.put_user(pb::PutUserRequest {
        name: "cron".into(),
        password: "pw".into(),
        create: true,
        ..Default::default()
    })
    .await?;
    acc2.grant(pb::GrantRequest {
        name: "cron".into(),
        mailbox: "/inbox".into(),
        perms: "list,download".into(),
        no_subtree: false,
    })
    .await?;
    acc2.put_user(pb::PutUserRequest {
        name: "nosy".into(),
        password: "pw".into(),
        create: true,
        ..Default::default()
    })
    .await?;
    let token = acc2
        .add_token(pb::AddTokenRequest {
            name: "cron".into(),
            label: "cron job".into(),
            ttl_ms: 0,
        })
        .await?
        .into_inner()
        .secret;
    let bearer = format!("Bearer {token}");
    // Without a login: 401, asking for one; a wrong password: 401; a
    // user who may not download from /inbox: 403.
    let r = http_request_as(&http, "GET", "/api/v1/events/scripts/next", long, None).await?;
    assert_eq!(r.status, 401, "{}", r.body);
    assert!(r.headers.contains_key("www-authenticate"));
    // base64("cron:wrong") and base64("nosy:pw").
    let r = http_request_as(
        &http,
        "GET",
        "/api/v1/events/scripts/next",
        long,
        Some("Basic Y3Jvbjp3cm9uZw=="),
    )
    .await?;
    assert_eq!(r.status, 401, "{}", r.body);
    let r = http_request_as(
        &http,
        "GET",
        "/api/v1/events/scripts/next",
        long,
        Some("Basic bm9zeTpwdw=="),
    )
    .await?;
    assert_eq!(r.status, 403, "{}", r.body);
    assert_eq!(json(&r.body)["error"], "permission_denied");
    // The right password works as the token does.
    let r = http_request_as(
        &http,
        "GET",
        "/api/v1/events/scripts/next",
        long,
        Some("Basic Y3Jvbjpwdw=="),
    )
    .await?;
    assert_eq!(r.status, 200, "{}", r.body);
    // A rule over the subtree of /inbox: a grant on /inbox alone (not its
    // sub-mailboxes) does not let its holder consume that queue.
    c.events()
        .put_rule(pb::PutRuleRequest {
            rule: Some(pb::RuleInfo {
                subtree: true,
                ..rule("tree", "tree", 30_000)
            }),
        })
        .await?;
    acc2.put_user(pb::PutUserRequest {
        name: "narrow".into(),
        password: "pw".into(),
        create: true,
        ..Default::default()
    })
    .await?;
    acc2.grant(pb::GrantRequest {
        name: "narrow".into(),
        mailbox: "/inbox".into(),
        perms: "list,download".into(),
        no_subtree: true,
    })
    .await?;
    // base64("narrow:pw").
    let narrow = Some("Basic bmFycm93OnB3");
    let r = http_request_as(&http, "GET", "/api/v1/events/tree/next", long, narrow).await?;
    assert_eq!(r.status, 403, "{}", r.body);
    let r = http_request_as(&http, "GET", "/api/v1/events/scripts/next", long, narrow).await?;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = http_request_as(
        &http,
        "GET",
        "/api/v1/events/tree/next",
        long,
        Some(&bearer),
    )
    .await?;
    assert_eq!(r.status, 200, "{}", r.body);
    let _ = acc;
    // Nothing due: the poll waits, and answers as soon as a file lands.
    let (h2, b2) = (http.clone(), bearer.clone());
    let poll = tokio::spawn(async move {
        let t = Instant::now();
        let r = http_request_as(
            &h2,
            "GET",
            "/api/v1/events/scripts/next?consumer=cron&wait=20s",
            Duration::from_secs(30),
            Some(&b2),
        )
        .await;
        (t.elapsed(), r)
    });
    // Give the poll time to start waiting; it must not have answered.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!poll.is_finished(), "answered with nothing due");
    let msg = put(&c, "a.csv", 3).await?;
    let (took, r) = poll.await?;
    let r = r?;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(
        took < Duration::from_secs(15),
        "the long poll answered after {took:?}"
    );
    let v = json(&r.body);
    assert_eq!(v[0]["message"]["id"], msg.as_str());
    assert_eq!(v[0]["attempt"], 1);
    assert_eq!(v[0]["lease_consumer"], "cron");
    let id = v[0]["id"].as_str().unwrap().to_string();
    // A wrong delivery number is a conflict; the right one completes it.
    let r = http_request_as(
        &http,
        "POST",
        &format!("/api/v1/events/{id}/ack?attempt=7&outcome=complete"),
        long,
        Some(&bearer),
    )
    .await?;
    assert_eq!(r.status, 409, "{}", r.body);
    assert_eq!(json(&r.body)["error"], "lease_lost");
    let r = http_request_as(
        &http,
        "POST",
        &format!("/api/v1/events/{id}/ack?attempt=1&outcome=complete&consumer=cron"),
        long,
        Some(&bearer),
    )
    .await?;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(json(&r.body)["status"], "complete");
    let r = http_request_as(
        &http,
        "GET",
        &format!("/api/v1/events/{id}"),
        long,
        Some(&bearer),
    )
    .await?;
    assert_eq!(json(&r.body)["attempts"][0]["outcome"], "complete");
    // The delivery number is required.
    let r = http_request_as(
        &http,
        "POST",
        &format!("/api/v1/events/{id}/ack?outcome=complete"),
        long,
        Some(&bearer),
    )
    .await?;
    assert_eq!(r.status, 400, "{}", r.body);
    // Bad input: a clear 400.
    let r = http_request_as(
        &http,
        "GET",
        "/api/v1/events/bad%20queue/next",
        long,
        Some(&bearer),
    )
    .await?;
    assert_eq!(r.status, 400, "{}", r.body);
    let r = http_request_as(
        &http,
        "POST",
        "/api/v1/events/not-an-id/ack?outcome=complete",
        long,
        Some(&bearer),
    )
    .await?;
    assert_eq!(r.status, 400, "{}", r.body);
    Ok(())
}

/// Every event of `queue`, through the listing's pages.
async fn all_events(c: &Client, queue: &str) -> anyhow::Result<Vec<pb::EventInfo>> {
    let mut out = Vec::new();
    let mut after = String::new();
    loop {
        let r = c
            .events()
            .list_events(pb::ListEventsRequest {
                queue: queue.into(),
                after: after.clone(),
                limit: 1000,
                ..Default::default()
            })
            .await?
            .into_inner();
        out.extend(r.events);
        if r.next_after.is_empty() {
            return Ok(out);
        }
        after = r.next_after;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn exactly_one_event_per_rule_and_message_across_leader_kills_in_a_burst(
) -> anyhow::Result<()> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    let n: usize = std::env::var("MAILBOX_EVENTS_BURST")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let east_opts = DcOptions {
        nodes: 3,
        ..Default::default()
    };
    let mut cl = TestCluster::start(&["east", "west"], east_opts, "").await?;
    let t = Duration::from_secs(60);
    let leader = cl.dc("east").wait_leader(t).await?;
    cl.dc("west").wait_leader(t).await?;
    let c = cl.dc("east").client().await?;
    c.mkdir("/inbox", true).await?;
    for (name, q) in [("ra", "qa"), ("rb", "qb")] {
        c.events()
            .put_rule(pb::PutRuleRequest {
                rule: Some(rule(name, q, 30_000)),
            })
            .await?;
    }
    let endpoints = cl.dc("east").endpoints();
    let acked: Arc<Mutex<BTreeMap<String, String>>> = Arc::default();
    let next = Arc::new(AtomicUsize::new(0));
    let mut writers = Vec::new();
    for w in 0..16usize {
        let (acked, next) = (acked.clone(), next.clone());
        let mut eps = endpoints.clone();
        let k = w % eps.len();
        eps.rotate_left(k);
        writers.push(tokio::spawn(async move {
            let mut client: Option<Client> = None;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return;
                }
                let name = format!("b{i:06}");
                // Retried with the same key until acknowledged: a retry of
                // an upload whose outcome was unknown stores nothing new.
                loop {
                    if client.is_none() {
                        client = Client::connect_any(&eps).await.ok();
                    }
                    let Some(c) = client.as_ref() else {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    };
                    let r = c
                        .put_bytes(
                            PutOptions {
                                mailbox: "/inbox".into(),
                                name: name.clone(),
                                idempotency_key: Some(name.clone()),
                                ..Default::default()
                            },
                            format!("burst {i}").into_bytes(),
                        )
                        .await;
                    match r {
                        Ok(r) => {
                            acked
                                .lock()
                                .unwrap()
                                .insert(name.clone(), r.message.unwrap().id);
                            break;
                        }
                        Err(_) => {
                            client = None;
                            eps.rotate_left(1);
                        }
                    }
                }
            }
        }));
    }
    // Kill the east leader twice during the burst (and bring it back).
    let mut killed = leader;
    for at in [n / 4, n * 3 / 5] {
        wait_for(Duration::from_secs(120), "uploads before a kill", || {
            let k = acked.lock().unwrap().len();
            async move { (k >= at).then_some(()) }
        })
        .await?;
        cl.dc("east").kill(killed);
        let new = cl.dc("east").wait_leader(t).await?;
        assert_ne!(new, killed);
        cl.dc("east").restart(killed)?;
        killed = new;
    }
    for w in writers {
        w.await?;
    }
    let acked = acked.lock().unwrap().clone();
    assert_eq!(acked.len(), n);
    let c = cl.dc("east").client().await?;
    let listed = c.list_all("/inbox").await?;
    assert_eq!(listed.len(), n, "retries with the key stored nothing twice");
    let stats = wait_for(
        Duration::from_secs(180),
        "an event per rule per file",
        || async {
            let a = queue(&c, "qa").await.ok()?;
            let b = queue(&c, "qb").await.ok()?;
            (a.raised as usize >= n && b.raised as usize >= n).then_some((a, b))
        },
    )
    .await?;
    assert_eq!((stats.0.raised as usize, stats.1.raised as usize), (n, n));
    let ids: BTreeSet<String> = listed.iter().map(|m| m.id.clone()).collect();
    for q in ["qa", "qb"] {
        let events = all_events(&c, q).await?;
        assert_eq!(events.len(), n, "{q}: one event per file");
        let per_message: BTreeSet<String> = events
            .iter()
            .map(|e| e.message.as_ref().unwrap().id.clone())
            .collect();
        assert_eq!(per_message, ids, "{q}: every file, none twice");
    }
    // Every node of east agrees (each has applied the same log).
    cl.dc("east")
        .wait_converged(Duration::from_secs(60))
        .await?;
    for id in 1..=3 {
        let s = queue(&cl.dc("east").client_of(id).await?, "qa").await?;
        assert_eq!(s.raised as usize, n, "node {id}");
    }
    eprintln!("{n} uploads across two leader kills: {n} events per rule, none twice");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn per_mailbox_order_holds_under_concurrent_consumers_and_retries() -> anyhow::Result<()> {
    use std::sync::{Arc, Mutex};
    let mut dc = TestDc::start(DcOptions {
        nodes: 1,
        ..Default::default()
    })
    .await?;
    dc.wait_leader(Duration::from_secs(30)).await?;
    let c = dc.client().await?;
    let boxes = ["/inbox/a", "/inbox/b", "/inbox/c"];
    for b in boxes {
        c.mkdir(b, true).await?;
    }
    let mut r = rule("ordered", "ord", 10_000);
    r.subtree = true;
    r.ordering = "per-mailbox".into();
    r.max_attempts = 10;
    c.events()
        .put_rule(pb::PutRuleRequest { rule: Some(r) })
        .await?;
    let per_box = 8;
    for i in 0..per_box {
        for b in boxes {
            c.put_bytes(
                PutOptions {
                    mailbox: b.into(),
                    name: format!("{i:02}"),
                    ..Default::default()
                },
                vec![b'o'; 10],
            )
            .await?;
        }
    }
    // Mailbox -> the event a consumer holds now (received, not answered).
    let held: Arc<Mutex<BTreeMap<String, String>>> = Arc::default();
    // Mailbox -> names completed, in completion order.
    let done: Arc<Mutex<BTreeMap<String, Vec<String>>>> = Arc::default();
    let mut consumers = Vec::new();
    for k in 0..4 {
        let (c, held, done) = (c.clone(), held.clone(), done.clone());
        consumers.push(tokio::spawn(async move {
            let mut s = c
                .events()
                .subscribe(pb::SubscribeRequest {
                    queue: "ord".into(),
                    consumer: format!("c{k}"),
                    max_in_flight: 4,
                    lease_ms: 0,
                })
                .await?
                .into_inner();
            while let Some(e) = s.next().await {
                let e = e?;
                let m = e.message.clone().unwrap();
                if let Some(other) = held.lock().unwrap().insert(m.mailbox.clone(), e.id.clone()) {
                    anyhow::bail!(
                        "{} delivered while {other} of the same mailbox was held",
                        e.id
                    );
                }
                // Every third file is retried once before it completes.
                let retry = e.attempt == 1 && m.name.parse::<u32>()? % 3 == 0;
                // Released before answering: the next event of the mailbox
                // may come only after the answer applies.
                held.lock().unwrap().remove(&m.mailbox);
                if !retry {
                    done.lock()
                        .unwrap()
                        .entry(m.mailbox.clone())
                        .or_default()
                        .push(m.name.clone());
                }
                c.events()
                    .ack(pb::AckRequest {
                        id: e.id,
                        attempt: e.attempt,
                        consumer: format!("c{k}"),
                        outcome: if retry { "retry" } else { "complete" }.into(),
                        delay_ms: Some(0),
                        ..Default::default()
                    })
                    .await?;
            }
            Ok(())
        }));
    }
    let total = per_box * boxes.len();
    wait_for(
        Duration::from_secs(60),
        "every ordered event complete",
        || async {
            let s = queue(&c, "ord").await.ok()?;
            (s.complete as usize == total).then_some(())
        },
    )
    .await?;
    for h in consumers {
        if h.is_finished() {
            h.await??; // a consumer that stopped early saw a violation
        } else {
            h.abort();
        }
    }
    let done = done.lock().unwrap().clone();
    let want: Vec<String> = (0..per_box).map(|i| format!("{i:02}")).collect();
    for b in boxes {
        assert_eq!(done[b], want, "{b}: completed in upload order");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn queue_takeover_with_the_origin_dc_killed_loses_nothing_and_repeats_nothing_completed(
) -> anyhow::Result<()> {
    let opts = DcOptions {
        nodes: 1,
        ..Default::default()
    };
    let mut cl = TestCluster::start(&["east", "west"], opts, "").await?;
    let t = Duration::from_secs(30);
    let east_leader = cl.dc("east").wait_leader(t).await?;
    cl.dc("west").wait_leader(t).await?;
    let east = cl.dc("east").client().await?;
    let west = cl.dc("west").client().await?;
    east.mkdir("/inbox", true).await?;
    east.events()
        .put_rule(pb::PutRuleRequest {
            rule: Some(rule("arrivals", "q", 3_000)),
        })
        .await?;
    let mut msgs = BTreeSet::new();
    for i in 0..20 {
        msgs.insert(put(&east, &format!("f{i}"), i).await?);
    }
    wait_for(t, "20 events raised at east", || async {
        (queue(&east, "q").await.ok()?.raised == 20).then_some(())
    })
    .await?;
    // Before any takeover west holds the events but does not deliver them
    // (it delivers what it raised itself: nothing).
    let none = west
        .events()
        .lease(pb::LeaseRequest {
            queue: "q".into(),
            consumer: "w".into(),
            max: 1,
            lease_ms: 0,
            wait_ms: 0,
        })
        .await?
        .into_inner();
    assert!(none.events.is_empty());

    // A consumer at east completes 8 and dies holding 2 more.
    let mut leased = Vec::new();
    while leased.len() < 10 {
        let r = east
            .events()
            .lease(pb::LeaseRequest {
                queue: "q".into(),
                consumer: "east-worker".into(),
                max: (10 - leased.len()) as u32,
                lease_ms: 0,
                wait_ms: 1_000,
            })
            .await?
            .into_inner();
        leased.extend(r.events);
    }
    let mut completed = BTreeSet::new();
    for e in &leased[..8] {
        east.events()
            .ack(pb::AckRequest {
                id: e.id.clone(),
                attempt: e.attempt,
                consumer: "east-worker".into(),
                outcome: "complete".into(),
                ..Default::default()
            })
            .await?;
        completed.insert(e.id.clone());
    }
    let in_flight: BTreeSet<String> = leased[8..].iter().map(|e| e.id.clone()).collect();
    // West sees every event's state: 8 complete, 2 leased, 10 waiting.
    wait_for(t, "west to see east's event states", || async {
        let q = queue(&west, "q").await.ok()?;
        (q.complete == 8 && q.processing == 2 && q.pending == 10).then_some(())
    })
    .await?;

    // East dies. The admin hands the queue to west (CLI). West heard from
    // east seconds ago (idle links commit keep-alives as contact): east
    // may be up and delivering, so the takeover is refused without
    // --force until east has been silent for 60 s.
    cl.dc("east").kill(east_leader);
    let killed_at = Instant::now();
    let mut takeover = || {
        cli(
            cl.dc("west"),
            &[
                "--json",
                "events",
                "takeover",
                "q",
                "--dc",
                "west",
                "--reason",
                "east is down",
            ],
        )
    };
    let (ok, _, err) = takeover()?;
    assert!(
        !ok && err.contains("heard from") && err.contains("--force"),
        "a takeover from a DC heard from just now went through: {err}"
    );
    let out = loop {
        let (ok, out, err) = takeover()?;
        if ok {
            break out;
        }
        assert!(err.contains("heard from"), "{err}");
        assert!(
            killed_at.elapsed() < Duration::from_secs(75),
            "still refused 75 s after east died: {err}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert!(
        // (60 s after west last heard from east, which may have been some
        // seconds before the kill on a loaded machine.)
        killed_at.elapsed() >= Duration::from_secs(30),
        "taken over {:?} after east died",
        killed_at.elapsed()
    );
    let q = json(&out)
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["queue"] == "q")
        .cloned()
        .unwrap();
    assert_eq!(q["handled_by"], "west");
    // (West answers for east's events now; had east survived, it would
    // refuse them, naming west.)

    // A consumer at west gets the 12 unfinished ones, each once; the two
    // that were leased when east died come as their second delivery.
    let mut seen = BTreeMap::new();
    let deadline = Instant::now() + t;
    while seen.len() < 12 && Instant::now() < deadline {
        let r = west
            .events()
            .lease(pb::LeaseRequest {
                queue: "q".into(),
                consumer: "west-worker".into(),
                max: 20,
                lease_ms: 0,
                wait_ms: 1_000,
            })
            .await?
            .into_inner();
        for e in r.events {
            assert!(
                !completed.contains(&e.id),
                "a completed event came again: {e:?}"
            );
            assert!(
                seen.insert(e.id.clone(), e.attempt).is_none(),
                "delivered twice: {e:?}"
            );
            west.events()
                .ack(pb::AckRequest {
                    id: e.id.clone(),
                    attempt: e.attempt,
                    consumer: "west-worker".into(),
                    outcome: "complete".into(),
                    ..Default::default()
                })
                .await?;
        }
    }
    assert_eq!(seen.len(), 12, "every unfinished event delivered at west");
    for (id, attempt) in &seen {
        let want = if in_flight.contains(id) { 2 } else { 1 };
        assert_eq!(*attempt, want, "event {id}");
    }
    let all = all_events(&west, "q").await?;
    assert_eq!(all.len(), 20);
    assert!(all.iter().all(|e| e.status == "complete"));
    let raised_for: BTreeSet<String> = all
        .iter()
        .map(|e| e.message.as_ref().unwrap().id.clone())
        .collect();
    assert_eq!(raised_for, msgs, "one event per message, none lost");

    // East comes back after more than 30 s down (an outage, by its own
    // record). Until it has read west's feed it leases nothing (consumers
    // are asked to retry); then it names west. It never delivers again
    // what west delivered, and the states stay complete everywhere.
    tokio::time::sleep_until((killed_at + Duration::from_secs(32)).into()).await;
    // Its link to west is down at first: it cannot have heard of the
    // takeover yet.
    cl.cut("east", "west");
    cl.dc("east").restart(east_leader)?;
    cl.dc("east").wait_leader(t).await?;
    let east = cl.dc("east").client().await?;
    let deadline = Instant::now() + t;
    let mut asked_to_retry = 0;
    loop {
        assert!(Instant::now() < deadline, "east never named west");
        let r = east
            .events()
            .lease(pb::LeaseRequest {
                queue: "q".into(),
                consumer: "east-worker".into(),
                max: 20,
                lease_ms: 0,
                wait_ms: 0,
            })
            .await;
        match r {
            Ok(r) => {
                let r = r.into_inner();
                assert!(
                    r.events.is_empty(),
                    "east delivered after the takeover: {:?}",
                    r.events
                );
            }
            // (Another unavailability, a leader still settling: retried.)
            Err(s) if s.code() == tonic::Code::Unavailable => {
                if !s.message().contains("not yet heard from") {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
                asked_to_retry += 1;
                if asked_to_retry == 1 {
                    // Nor does an admin's replay go through there: it
                    // would start a new generation over west's work.
                    let id = completed.iter().next().unwrap().clone();
                    let r = east
                        .events()
                        .replay(pb::ReplayRequest {
                            ids: vec![id],
                            force: true,
                        })
                        .await;
                    assert!(
                        matches!(&r, Err(s) if s.code() == tonic::Code::Unavailable
                            && s.message().contains("not yet heard from")),
                        "a replay went through at a DC that had not read the takeover: {r:?}"
                    );
                }
                if asked_to_retry == 3 {
                    cl.heal("east", "west");
                }
            }
            Err(s) if s.code() == tonic::Code::FailedPrecondition => {
                assert!(s.message().contains("west"), "{s:?}");
                break;
            }
            Err(s) => return Err(s.into()),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        asked_to_retry >= 3,
        "cut off from west, east asked to retry only {asked_to_retry} times"
    );
    wait_for(t, "east to see every event complete", || async {
        let all = all_events(&east, "q").await.ok()?;
        (all.len() == 20 && all.iter().all(|e| e.status == "complete")).then_some(())
    })
    .await?;
    assert!(all_events(&west, "q")
        .await?
        .iter()
        .all(|e| e.status == "complete"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dead_letters_notify_the_error_webhook_once_per_burst_with_a_count() -> anyhow::Result<()> {
    let mut dc = TestDc::start(DcOptions {
        nodes: 1,
        ..Default::default()
    })
    .await?;
    let t = Duration::from_secs(30);
    dc.wait_leader(t).await?;
    let c = dc.client().await?;
    c.mkdir("/bad", true).await?;
    let secret = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD".to_string();
    let rejecting = std::sync::Arc::new(Receiver {
        first: (400, usize::MAX),
        then: 400,
        seen: Default::default(),
    });
    // The alert receiver fails its first request: the bundle is sent again.
    let alerts = std::sync::Arc::new(Receiver {
        first: (503, 1),
        then: 200,
        seen: Default::default(),
    });
    let mut bad = rule("bad", "badq", 5_000);
    bad.mailbox = "/bad".into();
    bad.webhook_url = start_receiver(rejecting.clone()).await?;
    bad.webhook_secrets = vec![secret.clone()];
    bad.error_webhook_url = start_receiver(alerts.clone()).await?;
    bad.error_webhook_secrets = vec![secret.clone()];
    bad.error_window_ms = 3_000;
    c.events()
        .put_rule(pb::PutRuleRequest { rule: Some(bad) })
        .await?;
    let upload = |name: String| {
        let c = c.clone();
        async move {
            anyhow::Ok(
                c.put(
                    PutOptions {
                        mailbox: "/bad".into(),
                        name,
                        ..Default::default()
                    },
                    PatternReader::new(1, 10),
                    |_| {},
                )
                .await?
                .message
                .unwrap()
                .id,
            )
        }
    };
    let mut burst = BTreeSet::new();
    for i in 0..5 {
        burst.insert(upload(format!("x{i}")).await?);
    }
    let first = wait_for(t, "one notification", || async {
        alerts.seen.lock().unwrap().first().cloned()
    })
    .await?;
    // A dead-letter after the burst's window, while its notification
    // waits to be retried: the retry is the same notification (same id,
    // same count); this one gets its own.
    let later = upload("later".into()).await?;
    let retried = wait_for(t, "the retried notification", || async {
        alerts.seen.lock().unwrap().get(1).cloned()
    })
    .await?;
    assert_eq!(retried.0["webhook-id"], first.0["webhook-id"]);
    assert_eq!(retried.1, first.1, "the retry carries the same bundle");
    let (h, body) = first;
    let id = h["webhook-id"].to_str()?;
    let ts: i64 = h["webhook-timestamp"].to_str()?.parse()?;
    let want = mailbox_events::webhook::signature(std::slice::from_ref(&secret), id, ts, &body)
        .map_err(anyhow::Error::msg)?;
    assert_eq!(h["webhook-signature"].to_str()?, want);
    let v = json(std::str::from_utf8(&body)?);
    assert_eq!(v["type"], "events.dead_lettered");
    assert_eq!(v["rule"], "bad");
    assert_eq!(v["count"], 5, "the burst bundled into one: {v}");
    assert!(v["error"].as_str().unwrap().contains("HTTP 400"), "{v}");
    let listed: BTreeSet<String> = v["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(listed, burst);
    assert_eq!(
        queue(&c, "badq").await?.failed,
        6,
        "the burst and the later one"
    );

    // The later dead-letter: a notification of its own; the first burst is
    // not sent again (its notices were cleared).
    let second = wait_for(t, "a second notification", || async {
        alerts.seen.lock().unwrap().get(2).cloned()
    })
    .await?;
    assert_ne!(second.0["webhook-id"], retried.0["webhook-id"]);
    let v = json(std::str::from_utf8(&second.1)?);
    assert_eq!(v["count"], 1, "{v}");
    assert_eq!(v["messages"][0]["id"], later.as_str());
    assert_eq!(alerts.seen.lock().unwrap().len(), 3);
    Ok(())
}
