//! Invariant 1 inside one DC: an acknowledged upload is never lost, not by a
//! leader crash under load, a restart of every node, or a follower that was
//! down past a log purge.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mailbox_client::{Client, PutOptions};
use mailbox_testkit::{pattern_sha256, DcOptions, HashSink, PatternReader, TestDc};

/// What a writer saw acknowledged: id -> (seed, len, sha256).
type Acked = Arc<Mutex<BTreeMap<String, (u64, u64, String)>>>;

/// Every acknowledged upload downloads from `c` with the bytes the client
/// sent (its length and the digest of the generated payload, not the
/// digest the server reported).
async fn verify_all(c: &Client, acked: &Acked) -> anyhow::Result<()> {
    let acked = acked.lock().unwrap().clone();
    for (id, (seed, len, sha)) in &acked {
        let mut sink = HashSink::default();
        c.get_to(id, 0, 0, &mut sink, |_, _| {}).await?;
        assert_eq!(sink.len, *len, "size of {id}");
        assert_eq!(sink.hex(), pattern_sha256(*seed, *len), "bytes of {id}");
        assert_eq!(*sha, pattern_sha256(*seed, *len), "reported digest of {id}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_killed_under_load_loses_no_acknowledged_upload() -> anyhow::Result<()> {
    let mut dc = TestDc::start(DcOptions {
        inline_threshold: "16KiB".into(),
        segment_size: "256KiB".into(),
        ..Default::default()
    })
    .await?;
    dc.client().await?.mkdir("/inbox", false).await?;
    let leader = dc.wait_leader(Duration::from_secs(10)).await?;
    let endpoints = dc.endpoints();
    let acked: Acked = Arc::default();
    // Every upload attempted, acknowledged or not: name -> (seed, len).
    let sent: Arc<Mutex<BTreeMap<String, (u64, u64)>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..8u64 {
        let acked = acked.clone();
        let sent = sent.clone();
        let stop = stop.clone();
        // Each writer sticks to a node other than the leader where possible,
        // so forwarding is exercised, and fails over to any node.
        let mut eps = endpoints.clone();
        let n = eps.len();
        eps.rotate_left(w as usize % n);
        writers.push(tokio::spawn(async move {
            let mut seq = 0u64;
            let mut errors = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                seq += 1;
                let seed = w * 1_000_000 + seq;
                // Mix inline and segmented payloads.
                let len = if seq.is_multiple_of(3) {
                    600 << 10
                } else {
                    1 + (seed % 8000)
                };
                let Ok(c) = Client::connect(&eps).await else {
                    errors += 1;
                    continue;
                };
                let name = format!("w{w}-{seq}");
                sent.lock().unwrap().insert(name.clone(), (seed, len));
                let res = c
                    .put(
                        PutOptions {
                            mailbox: "/inbox".into(),
                            name,
                            ..Default::default()
                        },
                        PatternReader::new(seed, len),
                        |_| {},
                    )
                    .await;
                match res {
                    Ok(r) => {
                        let m = r.message.unwrap();
                        acked.lock().unwrap().insert(m.id, (seed, len, m.sha256));
                    }
                    Err(_) => errors += 1,
                }
            }
            errors
        }));
    }
    // Let load build up, then kill the leader while uploads are in flight.
    mailbox_testkit::wait_for(Duration::from_secs(30), "40 acknowledged uploads", || {
        let n = acked.lock().unwrap().len();
        async move { (n >= 40).then_some(()) }
    })
    .await?;
    let before_kill = acked.lock().unwrap().len();
    dc.kill(leader);
    let new_leader = dc.wait_leader(Duration::from_secs(20)).await?;
    assert_ne!(new_leader, leader);
    // Keep writing under the new leader for a while.
    mailbox_testkit::wait_for(Duration::from_secs(30), "uploads after failover", || {
        let n = acked.lock().unwrap().len();
        async move { (n >= before_kill + 40).then_some(()) }
    })
    .await?;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for w in writers {
        w.await?;
    }
    // Old leader comes back as a follower and must serve the same data.
    dc.restart(leader)?;
    dc.wait_leader(Duration::from_secs(20)).await?;
    dc.wait_converged(Duration::from_secs(30)).await?;
    for id in 1..=3 {
        verify_all(&dc.client_of(id).await?, &acked).await?;
    }
    // Unacknowledged uploads are whole or absent: every listed message is
    // one the clients sent and downloads with exactly the bytes sent.
    let c = dc.client().await?;
    let listed = c.list_all("/inbox").await?;
    let sent = sent.lock().unwrap().clone();
    let unacked = listed
        .iter()
        .filter(|m| !acked.lock().unwrap().contains_key(&m.id))
        .count();
    for m in &listed {
        let (seed, len) = *sent
            .get(&m.name)
            .unwrap_or_else(|| panic!("listed {} ({}) was never sent", m.id, m.name));
        let mut sink = HashSink::default();
        c.get_to(&m.id, 0, 0, &mut sink, |_, _| {}).await?;
        assert_eq!(
            sink.len, len,
            "listed message {} has the length sent",
            m.name
        );
        assert_eq!(
            sink.hex(),
            pattern_sha256(seed, len),
            "listed message {} has the bytes sent",
            m.name
        );
    }
    let names: std::collections::BTreeSet<&str> = listed.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(
        names.len(),
        listed.len(),
        "a name listed twice: an upload stored twice"
    );
    eprintln!(
        "{} uploads sent, {} acknowledged, {} listed ({unacked} unacknowledged but committed)",
        sent.len(),
        acked.lock().unwrap().len(),
        listed.len()
    );
    let acked_n = acked.lock().unwrap().len();
    assert!(
        listed.len() >= acked_n,
        "listed {} < acked {acked_n}",
        listed.len()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_restart_keeps_everything() -> anyhow::Result<()> {
    let mut dc = TestDc::start(DcOptions {
        snapshot_every: 50,
        keep_logs: 10,
        ..Default::default()
    })
    .await?;
    let c = dc.client().await?;
    c.mkdir("/inbox", false).await?;
    let acked: Acked = Arc::default();
    for i in 0..120u64 {
        let len = if i.is_multiple_of(10) {
            2 << 20
        } else {
            100 + i
        };
        let r = c
            .put(
                PutOptions {
                    mailbox: "/inbox".into(),
                    name: format!("f{i}"),
                    ..Default::default()
                },
                PatternReader::new(i, len),
                |_| {},
            )
            .await?;
        let m = r.message.unwrap();
        acked
            .lock()
            .unwrap()
            .insert(m.id, (i, len, pattern_sha256(i, len)));
    }
    // SIGKILL all three: nothing gets a chance to flush on the way out.
    for id in 1..=3 {
        dc.kill(id);
    }
    for id in 1..=3 {
        dc.restart(id)?;
    }
    dc.wait_leader(Duration::from_secs(30)).await?;
    dc.wait_converged(Duration::from_secs(30)).await?;
    for id in 1..=3 {
        let c = dc.client_of(id).await?;
        assert_eq!(c.list_all("/inbox").await?.len(), 120, "node {id}");
        verify_all(&c, &acked).await?;
    }
    // And the DC still takes writes.
    dc.client()
        .await?
        .put_bytes(
            PutOptions {
                mailbox: "/inbox".into(),
                name: "after".into(),
                ..Default::default()
            },
            b"still alive".to_vec(),
        )
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follower_down_past_purge_catches_up_by_snapshot() -> anyhow::Result<()> {
    let mut dc = TestDc::start(DcOptions {
        snapshot_every: 40,
        keep_logs: 5,
        ..Default::default()
    })
    .await?;
    let c0 = dc.client().await?;
    c0.mkdir("/inbox", false).await?;
    let leader = dc.wait_leader(Duration::from_secs(10)).await?;
    let follower = (1..=3).find(|&i| i != leader).unwrap();
    dc.stop(follower).await?;
    let c = dc.client().await?;
    let acked: Acked = Arc::default();
    for i in 0..200u64 {
        let len = 10 + i * 37 % 5000;
        let r = c
            .put_bytes(
                PutOptions {
                    mailbox: "/inbox".into(),
                    name: format!("f{i}"),
                    ..Default::default()
                },
                {
                    let mut v = Vec::new();
                    tokio::io::AsyncReadExt::read_to_end(&mut PatternReader::new(i, len), &mut v)
                        .await?;
                    v
                },
            )
            .await?;
        let m = r.message.unwrap();
        acked
            .lock()
            .unwrap()
            .insert(m.id, (i, len, pattern_sha256(i, len)));
    }
    // The leader must have purged past what the stopped follower holds.
    let status = c.cluster_status().await?;
    let lead = status
        .nodes
        .iter()
        .find(|n| n.node_id == status.leader_id)
        .unwrap();
    assert!(lead.applied_index > 200, "{lead:?}");
    dc.restart(follower)?;
    dc.wait_converged(Duration::from_secs(30)).await?;
    let fc = dc.client_of(follower).await?;
    assert_eq!(fc.list_all("/inbox").await?.len(), 200);
    verify_all(&fc, &acked).await?;
    // The follower's log shows it installed a snapshot rather than replaying.
    let log = std::fs::read_to_string(dc.dir().join(format!("node{follower}/mailboxd.log")))?;
    assert!(
        log.contains("snapshot installed"),
        "follower did not install a snapshot:\n{}",
        dc.log_tail(follower)
    );
    Ok(())
}
