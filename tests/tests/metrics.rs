//! The HTTP endpoint of real `mailboxd` processes: `/metrics` in the
//! Prometheus text format with values that follow what the nodes do
//! (uploads, errors, Raft indexes, per-remote-DC replication and fetcher
//! counters), and `/healthz` following leadership.

use std::time::Duration;

use mailbox_client::{Client, PutOptions};
use mailbox_testkit::{http_get, wait_for, DcOptions, PatternReader, Scrape, TestCluster, TestDc};

const WAIT: Duration = Duration::from_secs(30);

async fn put(c: &Client, name: &str, seed: u64, len: u64) -> anyhow::Result<String> {
    let r = c
        .put(
            PutOptions {
                mailbox: "/inbox".into(),
                name: name.into(),
                ..Default::default()
            },
            PatternReader::new(seed, len),
            |_| {},
        )
        .await?;
    Ok(r.message.expect("message").id)
}

fn val(s: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    s.get(name, labels)
        .unwrap_or_else(|| panic!("{name}{labels:?} missing"))
}

/// Every family a node exports, whatever its DC count.
const FAMILIES: &[(&str, &str)] = &[
    ("mailbox_raft_term", "gauge"),
    ("mailbox_raft_is_leader", "gauge"),
    ("mailbox_raft_has_leader", "gauge"),
    ("mailbox_raft_applied_index", "gauge"),
    ("mailbox_raft_last_log_index", "gauge"),
    ("mailbox_raft_proposed_entries_total", "counter"),
    ("mailbox_raft_proposed_commands_total", "counter"),
    ("mailbox_raft_forward_rpcs_total", "counter"),
    ("mailbox_raft_forwarded_commands_total", "counter"),
    ("mailbox_replication_feed_head", "gauge"),
    ("mailbox_replication_connected", "gauge"),
    ("mailbox_replication_cursor", "gauge"),
    ("mailbox_replication_remote_head", "gauge"),
    ("mailbox_replication_lag_records", "gauge"),
    ("mailbox_replication_lag_seconds", "gauge"),
    ("mailbox_replication_pull_retries_total", "counter"),
    ("mailbox_replication_pending_messages", "gauge"),
    ("mailbox_replication_pending_bytes", "gauge"),
    ("mailbox_replication_oldest_pending_seconds", "gauge"),
    ("mailbox_fetch_retries_total", "counter"),
    ("mailbox_fetch_corrupt_copies_total", "counter"),
    ("mailbox_fetch_segments_copied_total", "counter"),
    ("mailbox_uploads_total", "counter"),
    ("mailbox_upload_bytes_total", "counter"),
    ("mailbox_requests_failed_total", "counter"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_follow_uploads_errors_and_raft_state() -> anyhow::Result<()> {
    let dc = TestDc::start(DcOptions::default()).await?;
    for id in 1..=3 {
        // Followers learn the leader from its first heartbeat.
        let dc = &dc;
        wait_for(WAIT, "healthz 200", || async move {
            dc.healthz(id).await.ok().filter(|r| r.status == 200)
        })
        .await?;
    }
    let h = dc.healthz(1).await?;
    assert!(h.body.contains("\"leader\":"), "{}", h.body);
    assert!(h.body.contains("\"dc\":\"test\""), "{}", h.body);
    let nf = http_get(&dc.nodes[0].http_addr, "/nope").await?;
    assert_eq!(nf.status, 404);
    assert!(dc.metrics_url(2).starts_with("http://127.0.0.1:"));
    assert!(dc.metrics_url(2).ends_with("/metrics"));

    let c = dc.client_of(1).await?;
    c.mkdir("/inbox", false).await?;
    let before = dc.scrape(1).await?;
    for (name, kind) in FAMILIES {
        assert_eq!(
            before.types.get(*name).map(String::as_str),
            Some(*kind),
            "# TYPE of {name}"
        );
        assert!(before.help.contains_key(*name), "# HELP of {name}");
    }
    for s in &before.samples {
        assert!(before.types.contains_key(&s.name), "{} has no TYPE", s.name);
        assert_eq!(s.labels.get("dc").map(String::as_str), Some("test"));
        assert_eq!(s.labels.get("node").map(String::as_str), Some("1"));
    }
    let labels: &[(&str, &str)] = &[("ack", "delayed")];
    let uploads0 = val(&before, "mailbox_uploads_total", labels);
    let bytes0 = val(&before, "mailbox_upload_bytes_total", &[]);

    // One inline and one segmented upload, through node 1 (which may be a
    // follower: it forwards, but the upload is counted where it arrived).
    put(&c, "small", 1, 1000).await?;
    put(&c, "large", 2, 200_000).await?;
    // Two errors with different codes.
    let missing = "0190c6f0-0000-7000-8000-000000000000";
    assert_eq!(
        c.stat(missing).await.unwrap_err().code(),
        Some(tonic::Code::NotFound)
    );
    assert!(c.stat("not-an-id").await.is_err());

    let after = dc.scrape(1).await?;
    assert_eq!(val(&after, "mailbox_uploads_total", labels), uploads0 + 2.0);
    assert_eq!(
        val(&after, "mailbox_upload_bytes_total", &[]),
        bytes0 + 201_000.0
    );
    assert_eq!(
        val(&after, "mailbox_uploads_total", &[("ack", "immediate")]),
        0.0
    );
    assert!(
        val(
            &after,
            "mailbox_requests_failed_total",
            &[("code", "not_found")]
        ) >= 1.0
    );
    assert!(
        val(
            &after,
            "mailbox_requests_failed_total",
            &[("code", "invalid_argument")]
        ) >= 1.0
    );
    // Batching: node 1's two uploads went into its own log entries while
    // it led, into forward RPCs to the leader while it followed (either
    // way, whatever leader changes happened meanwhile).
    let grew = |name: &str| val(&after, name, &[]) - val(&before, name, &[]);
    let (entries, commands) = (
        grew("mailbox_raft_proposed_entries_total"),
        grew("mailbox_raft_proposed_commands_total"),
    );
    let (rpcs, forwarded) = (
        grew("mailbox_raft_forward_rpcs_total"),
        grew("mailbox_raft_forwarded_commands_total"),
    );
    assert!(commands >= entries && forwarded >= rpcs);
    assert!(
        commands + forwarded >= 2.0 && entries + rpcs >= 1.0,
        "entries {entries} commands {commands} rpcs {rpcs} forwarded {forwarded}"
    );
    // Only node 1 took uploads.
    let other = dc.scrape(2).await?;
    assert_eq!(val(&other, "mailbox_uploads_total", labels), 0.0);

    // Raft: indexes advanced past the uploads on every node, one leader,
    // one term.
    let applied1 = val(&after, "mailbox_raft_applied_index", &[]);
    assert!(applied1 >= 3.0, "applied index {applied1}");
    assert!(val(&after, "mailbox_raft_last_log_index", &[]) >= applied1);
    wait_for(WAIT, "every node applied the uploads, one leader", || {
        let dc = &dc;
        async move {
            let mut leaders = 0.0;
            let mut terms = Vec::new();
            for id in 1..=3 {
                let s = dc.scrape(id).await.ok()?;
                if s.get("mailbox_raft_applied_index", &[])? < applied1 {
                    return None;
                }
                leaders += s.get("mailbox_raft_is_leader", &[])?;
                terms.push(s.get("mailbox_raft_term", &[])?);
                if s.get("mailbox_raft_has_leader", &[])? != 1.0 {
                    return None;
                }
            }
            (leaders == 1.0 && terms.iter().all(|t| *t == terms[0] && *t >= 1.0)).then_some(())
        }
    })
    .await?;
    // A single DC has nothing to replicate.
    assert_eq!(
        val(&after, "mailbox_replication_pending_messages", &[]),
        0.0
    );
    assert!(after.get("mailbox_replication_cursor", &[]).is_none());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_fails_when_the_node_has_no_leader() -> anyhow::Result<()> {
    let mut dc = TestDc::start(DcOptions::default()).await?;
    let leader = dc.wait_leader(WAIT).await?;
    let survivor = (1..=3).find(|id| *id != leader).expect("a follower");
    wait_for(WAIT, "survivor healthy", || {
        let dc = &dc;
        async move { dc.healthz(survivor).await.ok().filter(|r| r.status == 200) }
    })
    .await?;
    // Without a majority the survivor's elections never succeed.
    for id in (1..=3).filter(|id| *id != survivor) {
        dc.kill(id);
    }
    let r = wait_for(WAIT, "healthz 503", || {
        let dc = &dc;
        async move { dc.healthz(survivor).await.ok().filter(|r| r.status == 503) }
    })
    .await?;
    assert!(r.body.contains("\"leader\":null"), "{}", r.body);
    let s = dc.scrape(survivor).await?;
    assert_eq!(val(&s, "mailbox_raft_has_leader", &[]), 0.0);
    assert_eq!(val(&s, "mailbox_raft_is_leader", &[]), 0.0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_show_replication_per_remote_dc() -> anyhow::Result<()> {
    let opts = DcOptions {
        nodes: 1,
        inline_threshold: "16KiB".into(),
        segment_size: "256KiB".into(),
        ..Default::default()
    };
    let mut cl = TestCluster::start(&["east", "west"], opts, "").await?;
    let east = cl.dc("east").client().await?;
    east.mkdir("/inbox", true).await?;
    // West's next download from east gets one bit flipped 100 KB in, inside
    // the first segment: the fetcher must count a corrupt copy and a retry.
    // (6 MB: too big to be pushed with its feed record, so it is fetched.)
    cl.corrupt_once("west", "east", 100_000);
    put(&east, "big", 5, 6_000_000).await?;

    let west_dc = &cl.dcs["west"];
    let west = wait_for(WAIT, "west fetched the payload", || async move {
        let s = west_dc.scrape(1).await.ok()?;
        let r = [("remote", "east")];
        let done = s.get("mailbox_fetch_segments_copied_total", &[])? >= 4.0
            && s.get("mailbox_replication_pending_messages", &[])? == 0.0
            && s.get("mailbox_replication_connected", &r)? == 1.0
            && s.get("mailbox_replication_lag_records", &r)? == 0.0
            && s.get("mailbox_replication_cursor", &r)? >= 2.0;
        done.then_some(s)
    })
    .await?;
    let r: &[(&str, &str)] = &[("remote", "east"), ("dc", "west")];
    assert_eq!(
        val(&west, "mailbox_replication_remote_head", r),
        val(&west, "mailbox_replication_cursor", r)
    );
    assert_eq!(val(&west, "mailbox_replication_lag_seconds", r), 0.0);
    assert_eq!(val(&west, "mailbox_replication_pending_bytes", &[]), 0.0);
    assert_eq!(
        val(&west, "mailbox_replication_oldest_pending_seconds", &[]),
        0.0
    );
    assert!(val(&west, "mailbox_fetch_corrupt_copies_total", &[]) >= 1.0);
    assert!(val(&west, "mailbox_fetch_retries_total", &[]) >= 1.0);
    assert_eq!(
        val(&west, "mailbox_uploads_total", &[("ack", "delayed")]),
        0.0
    );

    // East took the upload and learns west's replica ack through its pull.
    let east_dc = &cl.dcs["east"];
    let east_s = wait_for(WAIT, "east pulled west's ack", || async move {
        let s = east_dc.scrape(1).await.ok()?;
        (s.get("mailbox_replication_cursor", &[("remote", "west")])? >= 1.0
            && s.get("mailbox_replication_connected", &[("remote", "west")])? == 1.0)
            .then_some(s)
    })
    .await?;
    assert_eq!(
        val(&east_s, "mailbox_uploads_total", &[("ack", "delayed")]),
        1.0
    );
    assert_eq!(val(&east_s, "mailbox_upload_bytes_total", &[]), 6_000_000.0);
    assert_eq!(
        val(&east_s, "mailbox_fetch_segments_copied_total", &[]),
        0.0
    );

    // Cut: west's pull of east drops and its reconnects are counted.
    let cursor_before = val(&west, "mailbox_replication_cursor", r);
    let retries_before = val(&west, "mailbox_replication_pull_retries_total", r);
    cl.cut("east", "west");
    let west_dc = &cl.dcs["west"];
    wait_for(WAIT, "west sees east disconnected", || async move {
        let s = west_dc.scrape(1).await.ok()?;
        let r = [("remote", "east")];
        (s.get("mailbox_replication_connected", &r)? == 0.0
            && s.get("mailbox_replication_pull_retries_total", &r)? > retries_before)
            .then_some(())
    })
    .await?;
    // East keeps accepting; after the heal west catches up past it.
    put(&east, "during-cut", 6, 1000).await?;
    cl.heal("east", "west");
    let west_dc = &cl.dcs["west"];
    wait_for(WAIT, "west caught up after heal", || async move {
        let s = west_dc.scrape(1).await.ok()?;
        let r = [("remote", "east")];
        (s.get("mailbox_replication_connected", &r)? == 1.0
            && s.get("mailbox_replication_cursor", &r)? > cursor_before
            && s.get("mailbox_replication_lag_records", &r)? == 0.0)
            .then_some(())
    })
    .await?;
    Ok(())
}
