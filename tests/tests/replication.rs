//! Cross-DC replication (invariants 1–3): DCs cut off from each other keep
//! accepting uploads and converge once healed; `immediate` never
//! acknowledges before other DCs hold the payload and fails retryably when
//! they cannot; deletes during a partition stay deleted.

use std::collections::BTreeMap;
use std::time::Duration;

use mailbox_client::{Client, PutOptions};
use mailbox_testkit::{pattern_sha256, wait_for, DcOptions, HashSink, PatternReader, TestCluster};
use tonic::Code;

fn small_dcs() -> DcOptions {
    DcOptions {
        nodes: 1,
        inline_threshold: "16KiB".into(),
        segment_size: "256KiB".into(),
        ..Default::default()
    }
}

/// Like [`small_dcs`], with 3 nodes per DC (leaders can be killed).
fn three_node_dcs() -> DcOptions {
    DcOptions {
        nodes: 3,
        ..small_dcs()
    }
}

async fn put(
    c: &Client,
    name: &str,
    seed: u64,
    len: u64,
    key: Option<&str>,
) -> Result<mailbox_proto::v1::PutResponse, mailbox_client::ClientError> {
    c.put(
        PutOptions {
            mailbox: "/inbox".into(),
            name: name.into(),
            idempotency_key: key.map(String::from),
            ..Default::default()
        },
        PatternReader::new(seed, len),
        |_| {},
    )
    .await
}

/// Segments DC `dc` stored from payloads sent ahead of their records,
/// summed over its nodes.
async fn early_segments(cl: &mut TestCluster, dc: &str) -> f64 {
    let ids: Vec<u64> = cl.dc(dc).nodes.iter().map(|n| n.id).collect();
    let mut early = 0.0;
    for id in ids {
        if let Ok(s) = cl.dc(dc).scrape(id).await {
            early += s
                .get("mailbox_replica_segments_early_total", &[])
                .unwrap_or(0.0);
        }
    }
    early
}

/// id -> sha256 of everything a DC lists in /inbox, with every payload
/// downloaded from that DC and checked against its digest.
async fn content_digest(c: &Client) -> anyhow::Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for m in c.list_all("/inbox").await? {
        let mut sink = HashSink::default();
        c.get_to(&m.id, 0, 0, &mut sink, |_, _| {}).await?;
        let got = sink.hex();
        anyhow::ensure!(
            got == m.sha256,
            "{} downloads with a different digest",
            m.id
        );
        out.insert(m.id, got);
    }
    Ok(out)
}

async fn wait_caught_up(c: &Client, timeout: Duration) -> anyhow::Result<()> {
    wait_for(timeout, "replication caught up", || {
        let c = c.clone();
        async move {
            let s = c.replication_status().await.ok()?;
            let ok = s.pending_messages == 0
                && s.remotes
                    .iter()
                    .all(|r| r.lag_records == 0 && r.state == "connected");
            ok.then_some(())
        }
    })
    .await
}

/// Every DC has applied every other's whole feed and holds every payload.
async fn wait_synced(dcs: &[&Client], timeout: Duration) -> anyhow::Result<()> {
    mailbox_testkit::wait_dcs_synced(dcs, false, timeout).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitioned_dcs_converge_with_identical_bytes() -> anyhow::Result<()> {
    let mut cl = TestCluster::start(&["east", "west"], small_dcs(), "").await?;
    let east = cl.dc("east").client().await?;
    let west = cl.dc("west").client().await?;
    east.mkdir("/inbox", true).await?;
    west.mkdir("/inbox", true).await?;
    // Before the cut: a message replicates and completes.
    let m = put(&east, "before", 1, 600_000, None)
        .await?
        .message
        .unwrap();
    // A `delayed` answer shows the upload's own DC, since the message's
    // creation (as its apply recorded it).
    assert_eq!(m.replicas.len(), 1, "{m:?}");
    assert_eq!(m.replicas[0].dc, "east");
    assert_eq!(m.replicas[0].held_since_ms, m.created_ms);
    assert!(!m.payload_pending, "{m:?}");
    wait_for(Duration::from_secs(20), "complete in both DCs", || {
        let east = east.clone();
        let id = m.id.clone();
        async move { east.stat(&id).await.ok().filter(|s| s.complete_ms != 0) }
    })
    .await?;
    let ws = west.stat(&m.id).await?;
    assert!(!ws.payload_pending && ws.replicas.len() == 2, "{ws:?}");

    cl.cut("east", "west");
    let mut acked = BTreeMap::new();
    for i in 0..20u64 {
        // Both sides keep accepting uploads (delayed ack) while cut off.
        let len = if i % 4 == 0 { 700_000 } else { 100 + i * 997 };
        for (c, side) in [(&east, "e"), (&west, "w")] {
            let r = put(
                c,
                &format!("{side}{i}"),
                i * 2 + (side == "w") as u64,
                len,
                None,
            )
            .await?;
            let m = r.message.unwrap();
            acked.insert(m.id.clone(), m.sha256.clone());
        }
    }
    // While cut, the other side does not have them.
    assert!(east.list_all("/inbox").await?.len() < acked.len());
    cl.heal("east", "west");
    wait_synced(&[&east, &west], Duration::from_secs(60)).await?;
    wait_for(Duration::from_secs(30), "both DCs list everything", || {
        let (east, west) = (east.clone(), west.clone());
        let n = acked.len() + 1;
        async move {
            let a = east.list_all("/inbox").await.ok()?.len();
            let b = west.list_all("/inbox").await.ok()?.len();
            (a == n && b == n).then_some(())
        }
    })
    .await?;
    let de = content_digest(&east).await?;
    let dw = content_digest(&west).await?;
    assert_eq!(de, dw, "DCs differ after healing");
    for (id, sha) in &acked {
        assert_eq!(
            de.get(id),
            Some(sha),
            "acknowledged {id} missing or different"
        );
    }
    // Every message eventually completes at its origin.
    for id in acked.keys() {
        let origin = if east.stat(id).await?.origin_dc == "east" {
            &east
        } else {
            &west
        };
        let id = id.clone();
        wait_for(Duration::from_secs(20), "complete at origin", || {
            let (c, id) = (origin.clone(), id.clone());
            async move { c.stat(&id).await.ok().filter(|s| s.complete_ms != 0) }
        })
        .await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn immediate_fails_retryably_when_cut_off_and_retry_with_key_succeeds() -> anyhow::Result<()>
{
    let mut cl = TestCluster::start(
        &["east", "west"],
        small_dcs(),
        // A per-mailbox rule relaxes the cluster default for bulk drops.
        "ack = \"immediate\"\nimmediate-timeout = \"2s\"\n\
         ack-rules = [{ mailbox = \"/bulk/**\", ack = \"delayed\" }]\n",
    )
    .await?;
    let east = cl.dc("east").client().await?;
    east.mkdir("/inbox", true).await?;
    east.mkdir("/bulk/daily", true).await?;
    let west = cl.dc("west").client().await?;
    wait_synced(&[&east, &west], Duration::from_secs(30)).await?;
    // Connected: immediate works and the remote holds the payload at ack time.
    for (i, len) in [(1u64, 10u64), (2, 600_000)] {
        let r = put(&east, &format!("ok{i}"), i, len, None).await?;
        let id = r.message.unwrap().id;
        let ws = west.stat(&id).await?;
        assert!(
            !ws.payload_pending,
            "acknowledged before west held {id}: {ws:?}"
        );
    }
    cl.cut("east", "west");
    let t0 = std::time::Instant::now();
    let err = put(&east, "cut", 9, 500_000, Some("order-9"))
        .await
        .unwrap_err();
    let took = t0.elapsed();
    assert_eq!(err.code(), Some(Code::Unavailable), "{err}");
    assert!(
        took < Duration::from_secs(3),
        "took {took:?}, want < timeout + 1s"
    );
    assert!(err.to_string().contains("retry"), "{err}");
    // The rule for /bulk/** applies: acknowledged at once despite the cut.
    let bulk = east
        .put(
            PutOptions {
                mailbox: "/bulk/daily".into(),
                name: "b".into(),
                ..Default::default()
            },
            PatternReader::new(5, 500_000),
            |_| {},
        )
        .await?;
    assert!(bulk.message.is_some());
    cl.heal("east", "west");
    // Wait for the links to be back (state, not time), then retry.
    wait_synced(&[&east, &west], Duration::from_secs(30)).await?;
    let r = put(&east, "cut", 9, 500_000, Some("order-9")).await?;
    assert!(r.deduplicated, "retry must find the stored message");
    let id = r.message.unwrap().id;
    assert!(!west.stat(&id).await?.payload_pending);
    let named: Vec<_> = east
        .list_all("/inbox")
        .await?
        .into_iter()
        .filter(|m| m.name == "cut")
        .collect();
    assert_eq!(named.len(), 1, "exactly one message for the key");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn immediate_never_acknowledges_before_remote_holds_payload() -> anyhow::Result<()> {
    let mut cl =
        TestCluster::start(&["east", "west"], small_dcs(), "ack = \"immediate\"\n").await?;
    cl.set_delay(Duration::from_millis(10));
    let east = cl.dc("east").client().await?;
    east.mkdir("/inbox", true).await?;
    let west = cl.dc("west").client().await?;
    wait_synced(&[&east, &west], Duration::from_secs(30)).await?;
    let mut tasks = Vec::new();
    for w in 0..6u64 {
        let (east, west) = (east.clone(), west.clone());
        tasks.push(tokio::spawn(async move {
            for i in 0..5u64 {
                let len = if (w + i) % 2 == 0 { 300_000 } else { 2_000 };
                let r = put(&east, &format!("w{w}-{i}"), w * 100 + i, len, None).await?;
                let id = r.message.unwrap().id;
                // Checked against west's own state right after the ack.
                let ws = west.stat(&id).await?;
                anyhow::ensure!(!ws.payload_pending, "ack before west held {id}");
                let mut sink = HashSink::default();
                west.get_to(&id, 0, 0, &mut sink, |_, _| {}).await?;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    // The segmented uploads' payloads went ahead of their records (sent
    // while east committed) and west stored them from there.
    let early = early_segments(&mut cl, "west").await;
    assert!(early > 0.0, "no payload was sent ahead of its record");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_and_attribute_conflicts_during_partition_converge_and_pending_downloads_are_proxied(
) -> anyhow::Result<()> {
    let mut cl = TestCluster::start(&["east", "west"], small_dcs(), "").await?;
    let east = cl.dc("east").client().await?;
    let west = cl.dc("west").client().await?;
    east.mkdir("/inbox", true).await?;
    let keep = put(&east, "keep", 1, 900_000, None).await?.message.unwrap();
    let doomed = put(&east, "doomed", 2, 900_000, None)
        .await?
        .message
        .unwrap();
    wait_synced(&[&east, &west], Duration::from_secs(30)).await?;
    cl.cut("east", "west");
    east.delete(&doomed.id).await?;
    // West still has it during the partition; east never will again. A
    // change west makes to it meanwhile must not bring it back.
    let during = west.stat(&doomed.id).await?;
    let east_copy = during.copies.iter().find(|c| c.dc == "east").unwrap();
    assert!(
        !east_copy.error.is_empty(),
        "east is cut off: {east_copy:?}"
    );
    let attrs = |kv: &[(&str, &str)]| -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    west.set_attributes(&doomed.id, attrs(&[("late", "change")]), vec![])
        .await?;
    // Conflicting changes to the same attribute on both sides, plus one
    // attribute each: west writes last, so west's value wins everywhere.
    east.set_attributes(&keep.id, attrs(&[("status", "east"), ("e", "1")]), vec![])
        .await?;
    let before = mailbox_types::now_ms();
    wait_for(Duration::from_secs(5), "wall clock moves", || async move {
        (mailbox_types::now_ms() > before + 2).then_some(())
    })
    .await?;
    west.set_attributes(&keep.id, attrs(&[("status", "west"), ("w", "1")]), vec![])
        .await?;
    cl.heal("east", "west");
    wait_for(Duration::from_secs(30), "delete reaches west", || {
        let west = west.clone();
        let id = doomed.id.clone();
        async move { (west.stat(&id).await.err()?.code() == Some(Code::NotFound)).then_some(()) }
    })
    .await?;
    wait_synced(&[&east, &west], Duration::from_secs(30)).await?;
    assert_eq!(
        east.stat(&doomed.id).await.unwrap_err().code(),
        Some(Code::NotFound)
    );
    let (e, w) = (east.stat(&keep.id).await?, west.stat(&keep.id).await?);
    assert_eq!(e.attributes, w.attributes, "both DCs agree");
    // Stat asks every DC what it holds.
    for st in [&e, &w] {
        let dcs: Vec<_> = st.copies.iter().map(|c| c.dc.as_str()).collect();
        assert_eq!(dcs.len(), 2, "{:?}", st.copies);
        for c in &st.copies {
            assert!(c.error.is_empty(), "{c:?}");
            assert!(c.metadata_held && c.payload_held, "{c:?}");
            assert!(c.metadata_since_ms > 0 && c.payload_since_ms > 0, "{c:?}");
        }
    }
    assert_eq!(
        e.attributes.into_iter().collect::<BTreeMap<_, _>>(),
        attrs(&[("status", "west"), ("e", "1"), ("w", "1")])
    );
    // Every DC acknowledged the delete, so both purged the tombstone; the
    // message stays gone.
    wait_for(Duration::from_secs(30), "tombstones purged", || {
        let (east, west) = (east.clone(), west.clone());
        async move {
            let a = east.replication_status().await.ok()?.tombstones;
            let b = west.replication_status().await.ok()?.tombstones;
            (a == 0 && b == 0).then_some(())
        }
    })
    .await?;
    for c in [&east, &west] {
        assert_eq!(
            c.stat(&doomed.id).await.unwrap_err().code(),
            Some(Code::NotFound)
        );
        assert!(c
            .list_all("/inbox")
            .await?
            .iter()
            .all(|m| m.id != doomed.id));
    }

    // Proxying: slow the link so west has the metadata before the segments
    // (too big to travel with its feed record), then download from west
    // while its copy is still pending.
    cl.set_delay(Duration::from_millis(300));
    let big = put(&east, "big", 3, 6_000_000, None)
        .await?
        .message
        .unwrap();
    let pending = first_stat(&west, &big.id).await?;
    assert!(
        pending.payload_pending,
        "west must not hold the payload yet, or the download below proves nothing: {pending:?}"
    );
    let mut sink = HashSink::default();
    west.get_to(&big.id, 0, 0, &mut sink, |_, _| {}).await?;
    assert_eq!(sink.hex(), big.sha256);
    // A message small enough travels with its feed record: the moment west
    // has the metadata it has the payload too (no second round trip).
    let small = put(&east, "pushed", 4, 1_000_000, None)
        .await?
        .message
        .unwrap();
    let first_seen = first_stat(&west, &small.id).await?;
    assert!(
        !first_seen.payload_pending,
        "payload should arrive with the record: {first_seen:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_dcs_one_down_majority_acks_and_all_times_out() -> anyhow::Result<()> {
    for (quorum, expect_ok) in [("majority", true), ("all", false)] {
        let mut cl = TestCluster::start(
            &["east", "north", "west"],
            small_dcs(),
            &format!("ack = \"immediate\"\nimmediate-quorum = \"{quorum}\"\nimmediate-timeout = \"2s\"\n"),
        )
        .await?;
        let east = cl.dc("east").client().await?;
        east.mkdir("/inbox", true).await?;
        wait_caught_up(&east, Duration::from_secs(30)).await?;
        cl.isolate("north");
        let t0 = std::time::Instant::now();
        let res = put(&east, "m", 1, 400_000, Some("k")).await;
        match (expect_ok, res) {
            (true, Ok(r)) => {
                let id = r.message.unwrap().id;
                let west = cl.dc("west").client().await?;
                assert!(
                    !west.stat(&id).await?.payload_pending,
                    "majority ack before west held it"
                );
            }
            (false, Err(e)) => {
                assert_eq!(e.code(), Some(Code::Unavailable), "{e}");
                assert!(
                    t0.elapsed() < Duration::from_secs(3),
                    "took {:?}",
                    t0.elapsed()
                );
            }
            (want, got) => panic!("quorum {quorum}: expected ok={want}, got {got:?}"),
        }
        if !expect_ok {
            // Healing lets the same upload complete in every DC.
            cl.rejoin("north");
            let north = cl.dc("north").client().await?;
            let west = cl.dc("west").client().await?;
            wait_synced(&[&east, &north, &west], Duration::from_secs(30)).await?;
            let r = put(&east, "m", 1, 400_000, Some("k")).await?;
            assert!(r.deduplicated);
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_kills_in_both_dcs_during_replication_lose_and_duplicate_nothing(
) -> anyhow::Result<()> {
    let opts = three_node_dcs();
    let mut cl = TestCluster::start(&["east", "west"], opts, "").await?;
    let east = cl.dc("east").client().await?;
    east.mkdir("/inbox", true).await?;
    let west = cl.dc("west").client().await?;
    wait_synced(&[&east, &west], Duration::from_secs(30)).await?;
    // Uploaded while west is cut off, so that all of it is still to copy
    // when the link comes back, slowly.
    cl.cut("east", "west");
    let mut acked = BTreeMap::new();
    let mut big = Vec::new();
    for i in 0..12u64 {
        // Past the size that travels with its feed record: west's
        // fetcher copies these segment by segment.
        // Two of the others travel with their feed records (pushed).
        let len = match i % 6 {
            0 | 2 | 4 => 5_000_000,
            1 => 1_500_000,
            _ => 5_000,
        };
        let m = put(&east, &format!("f{i}"), i, len, None)
            .await?
            .message
            .unwrap();
        assert_eq!(m.sha256, pattern_sha256(i, len), "digest of what was sent");
        if len > 4 << 20 {
            big.push(m.id.clone());
        }
        acked.insert(m.id, m.sha256);
    }
    // 6 fetched messages of 20 segments of 256 KiB each.
    let total = big.len() * 20;
    let seg_dir = cl.dc("west").segment_dir();
    let copied = |dir: &std::path::Path| big.iter().map(|id| segment_files(dir, id)).sum::<usize>();
    let el = cl.dc("east").wait_leader(Duration::from_secs(10)).await?;
    let wl = cl.dc("west").wait_leader(Duration::from_secs(10)).await?;
    cl.set_delay(Duration::from_millis(40));
    cl.heal("east", "west");
    // Kill both leaders while west is provably still copying segments.
    let at_kill = wait_for(Duration::from_secs(60), "west mid-copy", || {
        let n = copied(&seg_dir);
        async move { (1..total / 2).contains(&n).then_some(n) }
    })
    .await?;
    cl.dc("east").kill(el);
    cl.dc("west").kill(wl);
    let after_kill = copied(&seg_dir);
    assert!(
        after_kill < total,
        "the copy finished before the kills ({at_kill} then {after_kill} of {total} segments)"
    );
    eprintln!("killed both leaders with {at_kill}..{after_kill} of {total} segments copied");
    cl.dc("east").wait_leader(Duration::from_secs(20)).await?;
    cl.dc("west").wait_leader(Duration::from_secs(20)).await?;
    cl.dc("east").restart(el)?;
    cl.dc("west").restart(wl)?;
    cl.set_delay(Duration::ZERO);
    let west = cl.dc("west").client().await?;
    let east = cl.dc("east").client().await?;
    wait_synced(&[&east, &west], Duration::from_secs(60)).await?;
    let dw = content_digest(&west).await?;
    assert_eq!(dw.len(), acked.len(), "west has duplicates or misses");
    for (id, sha) in &acked {
        assert_eq!(dw.get(id), Some(sha), "{id}");
    }
    // Every message completes at the origin exactly once.
    for id in acked.keys() {
        let id = id.clone();
        wait_for(Duration::from_secs(30), "complete at east", || {
            let (c, id) = (east.clone(), id.clone());
            async move { c.stat(&id).await.ok().filter(|s| s.complete_ms != 0) }
        })
        .await?;
    }
    // West's own feed carries exactly one replica ack per message.
    let ws = west.replication_status().await?;
    assert_eq!(
        ws.feed_head,
        acked.len() as u64,
        "west's feed: one Held per message, no duplicates"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_byte_flipped_in_transit_is_detected_and_fetched_again() -> anyhow::Result<()> {
    let mut cl = TestCluster::start(&["east", "west"], small_dcs(), "").await?;
    let east = cl.dc("east").client().await?;
    let west = cl.dc("west").client().await?;
    east.mkdir("/inbox", true).await?;
    wait_synced(&[&east, &west], Duration::from_secs(30)).await?;
    // West's next download stream from east gets one bit flipped 100 KB in:
    // inside the first segment's bytes (the feed carries only metadata here).
    cl.corrupt_once("west", "east", 100_000);
    let m = put(&east, "big", 5, 1_000_000, None)
        .await?
        .message
        .unwrap();
    wait_synced(&[&east, &west], Duration::from_secs(30)).await?;
    let s = west.replication_status().await?;
    assert!(s.corrupt_copies >= 1, "corruption not detected: {s:?}");
    let mut sink = HashSink::default();
    west.get_to(&m.id, 0, 0, &mut sink, |_, _| {}).await?;
    assert_eq!(sink.hex(), m.sha256, "west stored the corrupt copy");
    assert!(!west.stat(&m.id).await?.payload_pending);
    Ok(())
}

/// Inline payloads travel inside the feed's records: one damaged in transit
/// must be refused like a damaged segment, not stored as the message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inline_payload_flipped_in_transit_is_refused_and_pulled_again() -> anyhow::Result<()> {
    let mut cl = TestCluster::start(&["east", "west"], small_dcs(), "").await?;
    let east = cl.dc("east").client().await?;
    let west = cl.dc("west").client().await?;
    east.mkdir("/inbox", true).await?;
    wait_synced(&[&east, &west], Duration::from_secs(30)).await?;
    // 640 KB of inline payloads (16 KB each, the threshold) wait for west.
    cl.cut("east", "west");
    let mut sent = BTreeMap::new();
    for i in 0..40u64 {
        let m = put(&east, &format!("i{i}"), 500 + i, 16_000, None)
            .await?
            .message
            .unwrap();
        sent.insert(m.id, pattern_sha256(500 + i, 16_000));
    }
    // The first stream from east to reach 300 KB after the heal is the
    // feed carrying them: nearly all of its bytes are payload bytes.
    cl.corrupt_once("west", "east", 300_000);
    cl.heal("east", "west");
    wait_synced(&[&east, &west], Duration::from_secs(60)).await?;
    let got = content_digest(&west).await?;
    assert_eq!(got, sent, "west holds exactly the bytes east was sent");
    eprintln!(
        "corrupt copies detected by west: {}",
        west.replication_status().await?.corrupt_copies
    );
    Ok(())
}

/// Waits until `c`'s DC knows message `id` and returns that first stat.
async fn first_stat(c: &Client, id: &str) -> anyhow::Result<mailbox_proto::v1::MessageInfo> {
    wait_for(Duration::from_secs(20), "message known in the DC", || {
        let (c, id) = (c.clone(), id.to_string());
        async move { c.stat(&id).await.ok() }
    })
    .await
}

/// Segment files of message `id` in a DC's segment store.
fn segment_files(dir: &std::path::Path, id: &str) -> usize {
    mailbox_testkit::files_under(dir)
        .iter()
        .filter(|p| {
            p.parent()
                .and_then(|d| d.file_name())
                .and_then(|n| n.to_str())
                == Some(id)
                && p.extension().and_then(|e| e.to_str()) == Some("seg")
        })
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_fetching_node_mid_message_resumes_and_duplicates_nothing() -> anyhow::Result<()>
{
    let opts = three_node_dcs();
    let mut cl = TestCluster::start(&["east", "west"], opts, "").await?;
    let east = cl.dc("east").client().await?;
    east.mkdir("/inbox", true).await?;
    let west = cl.dc("west").client().await?;
    wait_synced(&[&east, &west], Duration::from_secs(30)).await?;
    // 64 segments over a slow link: west's fetcher (on west's leader) copies
    // them one by one, so there is a wide window with some but not all here.
    cl.set_delay(Duration::from_millis(40));
    const SEGS: usize = 64;
    let m = put(&east, "big", 77, (SEGS as u64) * 256 * 1024, None)
        .await?
        .message
        .unwrap();
    let seg_dir = cl.dc("west").segment_dir();
    let at_kill = wait_for(Duration::from_secs(60), "west mid-copy", || {
        let (dir, id) = (seg_dir.clone(), m.id.clone());
        async move {
            let n = segment_files(&dir, &id);
            (2..SEGS / 2).contains(&n).then_some(n)
        }
    })
    .await?;
    let wl = cl.dc("west").wait_leader(Duration::from_secs(10)).await?;
    cl.dc("west").kill(wl);
    let after_kill = segment_files(&seg_dir, &m.id);
    assert!(
        after_kill < SEGS,
        "the copy finished before the kill ({at_kill} then {after_kill} segments)"
    );
    let new_leader = cl.dc("west").wait_leader(Duration::from_secs(20)).await?;
    assert_ne!(new_leader, wl);
    cl.dc("west").restart(wl)?;
    cl.set_delay(Duration::ZERO);
    let west = cl.dc("west").client().await?;
    wait_synced(&[&east, &west], Duration::from_secs(90)).await?;
    assert_eq!(segment_files(&seg_dir, &m.id), SEGS);
    let tmp_left: Vec<_> = mailbox_testkit::files_under(&seg_dir)
        .into_iter()
        .filter(|p| p.to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(
        tmp_left.is_empty(),
        "half-written segments left: {tmp_left:?}"
    );
    let mut sink = HashSink::default();
    west.get_to(&m.id, 0, 0, &mut sink, |_, _| {}).await?;
    assert_eq!(sink.hex(), m.sha256);
    wait_for(Duration::from_secs(30), "complete at east", || {
        let (c, id) = (east.clone(), m.id.clone());
        async move { c.stat(&id).await.ok().filter(|s| s.complete_ms != 0) }
    })
    .await?;
    // Exactly one replica ack from west, and exactly one message.
    assert_eq!(west.replication_status().await?.feed_head, 1);
    assert_eq!(west.list_all("/inbox").await?.len(), 1);
    eprintln!("killed west's leader with {at_kill}..{after_kill} of {SEGS} segments copied");
    Ok(())
}

/// An upload received by a follower hands its payload to the leader, whose
/// feed stream sends it ahead of the record; the remote holds it with the
/// right bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_followers_upload_goes_ahead_of_its_record_through_the_leader() -> anyhow::Result<()> {
    let opts = DcOptions {
        nodes: 3,
        ..small_dcs()
    };
    let mut cl = TestCluster::start(&["east", "west"], opts, "").await?;
    let east = cl.dc("east");
    let leader = east.wait_leader(Duration::from_secs(30)).await?;
    let follower = east
        .nodes
        .iter()
        .map(|n| n.id)
        .find(|id| *id != leader)
        .unwrap();
    // Stays on the follower (no leader lookup).
    let via_follower = east.client_of(follower).await?;
    let east_leader = east.client_of(leader).await?;
    east_leader.mkdir("/inbox", true).await?;
    let west = cl.dc("west").client().await?;
    wait_synced(&[&east_leader, &west], Duration::from_secs(30)).await?;
    let m = put(&via_follower, "from-follower", 77, 300_000, None)
        .await?
        .message
        .unwrap();
    let (w, id) = (&west, &m.id);
    wait_for(Duration::from_secs(30), "west holds it", || async move {
        let s = w.stat(id).await.ok()?;
        (!s.payload_pending).then_some(())
    })
    .await?;
    let mut sink = HashSink::default();
    west.get_to(&m.id, 0, 0, &mut sink, |_, _| {}).await?;
    assert_eq!(sink.hex(), m.sha256, "west's copy differs");
    let early = early_segments(&mut cl, "west").await;
    assert!(
        early > 0.0,
        "the follower's payload did not go ahead of its record"
    );
    Ok(())
}

/// Issue #8: feed records every other DC has applied are trimmed (the
/// origin learns each DC's cursor from its reports); a DC rebuilt from
/// empty, whose cursor is then below the trimmed feed, is resynced from
/// the origin's state and gets every one of its messages back, byte for
/// byte, instead of a feed with a gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dc_rebuilt_from_empty_is_resynced_from_a_trimmed_feed() -> anyhow::Result<()> {
    let mut cl = TestCluster::start(&["east", "west"], small_dcs(), "").await?;
    let east = cl.dc("east").client().await?;
    let west = cl.dc("west").client().await?;
    east.mkdir("/inbox", true).await?;
    let mut sent = BTreeMap::new();
    let mut ids = Vec::new();
    for i in 0..12u64 {
        // Inline and segmented.
        let len = if i % 3 == 0 { 600_000 } else { 100 + i * 1_000 };
        let m = put(&east, &format!("f{i}"), 40 + i, len, Some(&format!("k{i}")))
            .await?
            .message
            .unwrap();
        sent.insert(m.id.clone(), pattern_sha256(40 + i, len));
        ids.push(m.id);
    }
    let (first_id, fifth_id) = (ids[0].clone(), ids[4].clone());
    let gone = put(&east, "deleted", 99, 500, Some("kdel"))
        .await?
        .message
        .unwrap();
    east.delete(&gone.id).await?;
    wait_synced(&[&east, &west], Duration::from_secs(60)).await?;
    // West's own uploads, inline and segmented, held in east too.
    for (i, len) in [(0u64, 3_000u64), (1, 700_000)] {
        let m = put(&west, &format!("w{i}"), 70 + i, len, None)
            .await?
            .message
            .unwrap();
        sent.insert(m.id.clone(), pattern_sha256(70 + i, len));
    }
    wait_synced(&[&east, &west], Duration::from_secs(60)).await?;
    let trimmed = wait_for(Duration::from_secs(30), "east's feed trimmed", || {
        let east = east.clone();
        async move {
            let s = east.replication_status().await.ok()?;
            (s.feed_floor > 0 && s.feed_records < s.feed_head).then_some(s)
        }
    })
    .await?;
    let scrape = cl.dc("east").scrape(1).await?;
    let kept = scrape
        .get("mailbox_replication_feed_records", &[])
        .expect("the feed length is a metric");
    assert!(
        kept < trimmed.feed_head as f64,
        "{kept} records kept of {}",
        trimmed.feed_head
    );

    // West loses everything and starts again from empty.
    cl.dc("west").kill(1);
    let wdir = cl.dc("west").dir().to_path_buf();
    std::fs::remove_dir_all(wdir.join("node1").join("data"))?;
    std::fs::remove_dir_all(wdir.join("segments"))?;
    cl.dc("west").restart(1)?;
    cl.dc("west").wait_leader(Duration::from_secs(30)).await?;
    let west = cl.dc("west").client().await?;
    // East refuses west's new feed under the old cursor until reset.
    wait_for(
        Duration::from_secs(30),
        "east sees west's feed changed",
        || {
            let east = east.clone();
            async move {
                let s = east.replication_status().await.ok()?;
                eprintln!("east's view: {:?}", s.remotes);
                s.remotes
                    .iter()
                    .any(|r| r.dc == "west" && r.state == "feed-identity-changed")
                    .then_some(())
            }
        },
    )
    .await?;
    east.reset_feed("west").await?;
    wait_synced(&[&east, &west], Duration::from_secs(90)).await?;
    let dw = content_digest(&west).await?;
    assert_eq!(
        dw, sent,
        "west got every message back (east's, and its own from east's copies), byte for byte"
    );
    assert!(
        west.stat(&gone.id).await.is_err(),
        "the deleted one stays deleted"
    );
    // Its key outlives the delete there too: a retry is the same success.
    let again = put(&west, "deleted", 99, 500, Some("kdel")).await?;
    assert!(again.deduplicated, "{again:?}");
    assert_eq!(again.message.unwrap().id, gone.id);
    // The keys answer in the rebuilt DC: a retry there is the same message.
    for (i, id) in [(0u64, &first_id), (4, &fifth_id)] {
        let len = if i % 3 == 0 { 600_000 } else { 100 + i * 1_000 };
        let retry = put(&west, &format!("f{i}"), 40 + i, len, Some(&format!("k{i}"))).await?;
        assert!(retry.deduplicated, "{retry:?}");
        assert_eq!(retry.message.unwrap().id, *id);
    }
    Ok(())
}

/// What one side's writers sent and had acknowledged.
#[derive(Default)]
struct Sent {
    /// Every upload attempted: name -> (seed, len).
    sent: BTreeMap<String, (u64, u64)>,
    /// Acknowledged: id -> name.
    acked: BTreeMap<String, String>,
}

/// Writers uploading into `eps` (one DC) until `stop`, each with its own
/// client that fails over between the DC's nodes; inline and segmented
/// sizes, delayed acks.
fn start_writers(
    side: &'static str,
    eps: Vec<String>,
    n: u64,
    sent: std::sync::Arc<std::sync::Mutex<Sent>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..n)
        .map(|w| {
            let (eps, sent, stop) = (eps.clone(), sent.clone(), stop.clone());
            tokio::spawn(async move {
                let mut seq = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    seq += 1;
                    let seed = (side == "w") as u64 * 1_000_000_000 + w * 1_000_000 + seq;
                    let len = if seq.is_multiple_of(4) {
                        600_000
                    } else {
                        1 + seed % 9000
                    };
                    // Paced (about 5 uploads/s per writer), so that two
                    // minutes of them stay a few hundred MB per side.
                    let next = tokio::time::Instant::now() + Duration::from_millis(200);
                    let name = format!("{side}{w}-{seq}");
                    let Ok(c) = Client::connect(&eps).await else {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    };
                    sent.lock().unwrap().sent.insert(name.clone(), (seed, len));
                    if let Ok(Some(m)) = put(&c, &name, seed, len, None).await.map(|r| r.message) {
                        sent.lock().unwrap().acked.insert(m.id, name);
                    }
                    tokio::time::sleep_until(next).await;
                }
            })
        })
        .collect()
}

/// Invariant 1 across a long DC partition: two 3-node DCs cut off from each
/// other for `MAILBOX_PARTITION_SECS` (120 s) while 4 clients per side keep
/// uploading, and each DC's leader is killed (and restarted) during the
/// cut. After healing, both DCs list the same set; every acknowledged
/// upload is there with the bytes its client sent; every listed message is
/// one a client sent, whole, and stored once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_two_minute_partition_with_leader_kills_on_both_sides_loses_nothing() -> anyhow::Result<()>
{
    let secs: u64 = std::env::var("MAILBOX_PARTITION_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(120);
    let opts = three_node_dcs();
    let mut cl = TestCluster::start(&["east", "west"], opts, "").await?;
    let east = cl.dc("east").client().await?;
    let west = cl.dc("west").client().await?;
    east.mkdir("/inbox", true).await?;
    wait_synced(&[&east, &west], Duration::from_secs(30)).await?;
    cl.cut("east", "west");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (es, ws) = (
        std::sync::Arc::new(std::sync::Mutex::new(Sent::default())),
        std::sync::Arc::new(std::sync::Mutex::new(Sent::default())),
    );
    let mut writers = start_writers("e", cl.dc("east").endpoints(), 4, es.clone(), stop.clone());
    writers.extend(start_writers(
        "w",
        cl.dc("west").endpoints(),
        4,
        ws.clone(),
        stop.clone(),
    ));
    let started = tokio::time::Instant::now();
    let cut_ends = started + Duration::from_secs(secs);
    // A leader kill in each DC during the cut: east's at a third of it,
    // west's at two thirds, each once that side has acknowledged uploads.
    for (dc, sent, at) in [("east", &es, secs / 3), ("west", &ws, 2 * secs / 3)] {
        let before = sent.lock().unwrap().acked.len();
        wait_for(
            Duration::from_secs(secs + 60),
            "uploads acknowledged before the kill",
            || {
                let n = sent.lock().unwrap().acked.len();
                let due = tokio::time::Instant::now() >= started + Duration::from_secs(at);
                async move { (due && n > before + 10).then_some(()) }
            },
        )
        .await?;
        let l = cl.dc(dc).wait_leader(Duration::from_secs(20)).await?;
        cl.dc(dc).kill(l);
        let nl = cl.dc(dc).wait_leader(Duration::from_secs(30)).await?;
        cl.dc(dc).restart(l)?;
        let after = sent.lock().unwrap().acked.len();
        wait_for(
            Duration::from_secs(60),
            "uploads acknowledged after the kill",
            || {
                let n = sent.lock().unwrap().acked.len();
                async move { (n > after + 10).then_some(()) }
            },
        )
        .await?;
        eprintln!("{dc}: killed leader {l}, new leader {nl}, {after} acknowledged so far");
    }
    // The cut lasts its full length, with the writers going.
    wait_for(
        Duration::from_secs(secs + 60),
        "the end of the cut",
        || async move { (tokio::time::Instant::now() >= cut_ends).then_some(()) },
    )
    .await?;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for w in writers {
        w.await?;
    }
    // The cut held: neither side has anything of the other's yet.
    let east = cl.dc("east").client().await?;
    let west = cl.dc("west").client().await?;
    let (le, lw) = (
        east.list_all("/inbox").await?,
        west.list_all("/inbox").await?,
    );
    anyhow::ensure!(
        le.iter().all(|m| m.name.starts_with('e')) && lw.iter().all(|m| m.name.starts_with('w')),
        "uploads crossed the cut"
    );
    anyhow::ensure!(!le.is_empty() && !lw.is_empty(), "no uploads on one side");
    cl.heal("east", "west");
    wait_synced(&[&east, &west], Duration::from_secs(240)).await?;
    let mut sent = es.lock().unwrap().sent.clone();
    sent.extend(ws.lock().unwrap().sent.clone());
    let mut acked = es.lock().unwrap().acked.clone();
    acked.extend(ws.lock().unwrap().acked.clone());
    let mut reference: Option<BTreeMap<String, String>> = None;
    for dc in ["east", "west"] {
        cl.dc(dc).wait_converged(Duration::from_secs(120)).await?;
        let c = cl.dc(dc).client().await?;
        let listed = c.list_all("/inbox").await?;
        let mut ids = BTreeMap::new();
        for m in &listed {
            let (seed, len) = *sent
                .get(&m.name)
                .unwrap_or_else(|| panic!("{dc} lists {} ({}), never sent", m.id, m.name));
            anyhow::ensure!(
                ids.insert(m.id.clone(), m.name.clone()).is_none(),
                "{dc} lists {} twice",
                m.id
            );
            let mut sink = HashSink::default();
            c.get_to(&m.id, 0, 0, &mut sink, |_, _| {}).await?;
            anyhow::ensure!(
                sink.len == len && sink.hex() == pattern_sha256(seed, len),
                "{dc}: {} does not hold the bytes sent",
                m.name
            );
        }
        let names: std::collections::BTreeSet<&String> = ids.values().collect();
        anyhow::ensure!(names.len() == ids.len(), "{dc}: an upload stored twice");
        for (id, name) in &acked {
            anyhow::ensure!(
                ids.get(id) == Some(name),
                "{dc} lost acknowledged {name} ({id})"
            );
        }
        match &reference {
            None => reference = Some(ids),
            Some(r) => anyhow::ensure!(*r == ids, "east and west list different sets"),
        }
    }
    eprintln!(
        "partition of {secs}s: {} uploads sent, {} acknowledged, {} listed in both DCs",
        sent.len(),
        acked.len(),
        reference.map(|r| r.len()).unwrap_or(0)
    );
    Ok(())
}

/// A leader that loses leadership while its feed pull is connected (and
/// idle) must give the pull up, so that it pulls again when it leads
/// again. Before, the pull's receiver stopped on the next keep-alive but
/// its committing half waited for more batches forever: the node, once it
/// led again, never pulled that feed again, shown as `connected` with a
/// frozen cursor (seen in the fault suite as a DC stuck behind another's
/// feed head for minutes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_that_leads_again_pulls_again() -> anyhow::Result<()> {
    let mut cl = TestCluster::start(&["east", "west"], three_node_dcs(), "").await?;
    let west = cl.dc("west").client().await?;
    west.mkdir("/inbox", true).await?;
    cl.dc("east").client().await?.mkdir("/inbox", true).await?;
    put(&west, "before", 1, 100, None).await?;
    let east = cl.dc("east").client().await?;
    wait_for(Duration::from_secs(30), "the first upload in east", || {
        let east = east.clone();
        async move { (east.list_all("/inbox").await.ok()?.len() == 1).then_some(()) }
    })
    .await?;
    let first = cl.dc("east").wait_leader(Duration::from_secs(10)).await?;
    // Leadership away from `first` while it stays up, then back to it.
    let others: Vec<u64> = (1..=3).filter(|&i| i != first).collect();
    cl.dc("east").pause(first);
    {
        let d = &*cl.dc("east");
        let others = &others;
        wait_for(
            Duration::from_secs(30),
            "another east leader",
            || async move {
                for &o in others {
                    if let Some(l) = d.leader_seen_by(o).await.filter(|&l| l != first) {
                        return Some(l);
                    }
                }
                None
            },
        )
        .await?;
    }
    cl.dc("east").resume(first);
    // Once it knows it no longer leads, its pull of west ends (within a
    // keep-alive): shown as idle, not as a `connected` pull nobody runs.
    let c_first = cl.dc("east").client_of(first).await?;
    wait_for(
        Duration::from_secs(20),
        "the former leader's pull to end",
        || {
            let c = c_first.clone();
            async move {
                let s = c.replication_status().await.ok()?;
                s.remotes
                    .iter()
                    .any(|r| r.dc == "west" && r.state == "idle")
                    .then_some(())
            }
        },
    )
    .await?;
    cl.dc("east").lead_again(first).await?;
    put(&west, "after", 2, 100, None).await?;
    let east = cl.dc("east").client_of(first).await?;
    wait_for(Duration::from_secs(30), "the second upload in east", || {
        let east = east.clone();
        async move { (east.list_all("/inbox").await.ok()?.len() == 2).then_some(()) }
    })
    .await?;
    Ok(())
}
