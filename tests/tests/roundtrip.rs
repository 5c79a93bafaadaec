//! Round trips through a 3-node DC of real processes: every boundary size
//! between inline and segmented storage, ranges, listing, idempotency and
//! delete. Each download is compared by SHA-256 with what was sent.

use mailbox_client::{Client, PutOptions};
use mailbox_testkit::{pattern_sha256, DcOptions, HashSink, PatternReader, TestDc};

const T: u64 = 64 << 10; // inline threshold
const S: u64 = 1 << 20; // segment size

async fn put_pattern(
    c: &Client,
    name: &str,
    seed: u64,
    len: u64,
) -> anyhow::Result<mailbox_proto::v1::MessageInfo> {
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
    Ok(r.message.expect("message"))
}

async fn download_sha(
    c: &Client,
    id: &str,
    offset: u64,
    length: u64,
) -> anyhow::Result<(u64, String)> {
    let mut sink = HashSink::default();
    c.get_to(id, offset, length, &mut sink, |_, _| {}).await?;
    let n = sink.len;
    Ok((n, sink.hex()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sizes_round_trip_with_equal_sha256() -> anyhow::Result<()> {
    let mut dc = TestDc::start(DcOptions::default()).await?;
    let c = dc.client().await?;
    c.mkdir("/inbox", false).await?;
    let sizes = [0, 1, T - 1, T, T + 1, 2 * S, 3 * S + 1];
    for (seed, &len) in sizes.iter().enumerate() {
        let m = put_pattern(&c, &format!("f{len}"), seed as u64, len).await?;
        let want = pattern_sha256(seed as u64, len);
        assert_eq!(m.size, len);
        assert_eq!(m.sha256, want, "server digest for {len}");
        assert_eq!(m.inline, len <= T, "inline flag for {len}");
        // The answer's replication status is built without reading the
        // state (a new `delayed` upload): it must be what the state says.
        let st = c.stat_local(&m.id).await?;
        assert_eq!(
            (
                &m.replicas,
                m.complete_ms,
                m.payload_pending,
                m.metadata_since_ms
            ),
            (
                &st.replicas,
                st.complete_ms,
                st.payload_pending,
                st.metadata_since_ms
            ),
            "status in the put answer against stat for {len}"
        );
        assert!(m.complete_ms != 0 && m.replicas.len() == 1, "{m:?}");
        let expect_segments = if len <= T { 0 } else { len.div_ceil(S) };
        assert_eq!(
            m.segments.len() as u64,
            expect_segments,
            "segments for {len}"
        );
        // Read back from every node, not only the one that took the write.
        for id in 1..=3 {
            let nc = dc.client_of(id).await?;
            // A follower may be a few ms behind; stat until it has the message.
            mailbox_testkit::wait_for(
                std::time::Duration::from_secs(5),
                "message on follower",
                || {
                    let nc = nc.clone();
                    let mid = m.id.clone();
                    async move { nc.stat(&mid).await.ok() }
                },
            )
            .await?;
            let (n, sha) = download_sha(&nc, &m.id, 0, 0).await?;
            assert_eq!(
                (n, sha.as_str()),
                (len, want.as_str()),
                "node {id} size {len}"
            );
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_gib_round_trip() -> anyhow::Result<()> {
    let mut dc = TestDc::start(DcOptions {
        segment_size: "8MiB".into(),
        ..Default::default()
    })
    .await?;
    let c = dc.client().await?;
    c.mkdir("/inbox", false).await?;
    let len = 1u64 << 30;
    let m = put_pattern(&c, "big", 42, len).await?;
    let want = pattern_sha256(42, len);
    assert_eq!(m.sha256, want);
    assert_eq!(m.segments.len(), 128);
    let (n, sha) = download_sha(&c, &m.id, 0, 0).await?;
    assert_eq!((n, sha), (len, want));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ranges_list_idempotency_delete() -> anyhow::Result<()> {
    let mut dc = TestDc::start(DcOptions::default()).await?;
    let c = dc.client().await?;
    c.mkdir("/partners/acme/inbox", true).await?;
    let data: Vec<u8> = (0..(3 * S + 17)).map(|i| (i % 251) as u8).collect();
    let put = |name: &str, key: Option<&str>| PutOptions {
        mailbox: "/partners/acme/inbox".into(),
        name: name.into(),
        idempotency_key: key.map(String::from),
        ..Default::default()
    };
    let m = c
        .put_bytes(put("big.bin", None), data.clone())
        .await?
        .message
        .unwrap();

    // Ranges inside one segment, across a boundary, to the end, and empty.
    for (off, len) in [
        (0, 10),
        (S - 5, 10),
        (2 * S + 3, S),
        (3 * S, 0),
        (data.len() as u64, 0),
    ] {
        let mut out = Vec::new();
        c.get_to(&m.id, off, len, &mut out, |_, _| {}).await?;
        let end = if len == 0 {
            data.len() as u64
        } else {
            (off + len).min(data.len() as u64)
        };
        assert_eq!(out, &data[off as usize..end as usize], "range {off}+{len}");
    }
    let err = c
        .get_to(&m.id, data.len() as u64 + 1, 0, &mut Vec::new(), |_, _| {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(tonic::Code::InvalidArgument));

    // Idempotency: same key returns the original message, small and large.
    let a = c
        .put_bytes(put("a", Some("key-1")), b"first".to_vec())
        .await?;
    let b = c
        .put_bytes(put("a", Some("key-1")), b"second".to_vec())
        .await?;
    assert!(!a.deduplicated && b.deduplicated);
    assert_eq!(
        a.message.as_ref().unwrap().id,
        b.message.as_ref().unwrap().id
    );
    let big1 = c.put_bytes(put("b", Some("key-2")), data.clone()).await?;
    let big2 = c.put_bytes(put("b", Some("key-2")), data.clone()).await?;
    assert!(big2.deduplicated);
    assert_eq!(big1.message.unwrap().id, big2.message.unwrap().id);

    // Listing pages in creation order.
    for i in 0..5 {
        c.put_bytes(put(&format!("n{i}"), None), vec![i]).await?;
    }
    let all = c.list_all("/partners/acme/inbox").await?;
    assert_eq!(all.len(), 8);
    let p1 = c.list("/partners/acme/inbox", "", 3).await?;
    assert_eq!(p1.messages.len(), 3);
    let p2 = c.list("/partners/acme/inbox", &p1.next_after, 100).await?;
    assert_eq!(p2.messages.len(), 5);
    assert!(p2.next_after.is_empty());
    let ids: Vec<_> = all.iter().map(|m| m.id.clone()).collect();
    let mut sorted = ids.clone();
    sorted.sort();
    assert_eq!(ids, sorted, "listing is in id (creation) order");

    // Delete: gone from stat, get and list; segments removed.
    c.delete(&m.id).await?;
    assert_eq!(
        c.stat(&m.id).await.unwrap_err().code(),
        Some(tonic::Code::NotFound)
    );
    assert_eq!(
        c.delete(&m.id).await.unwrap_err().code(),
        Some(tonic::Code::NotFound)
    );
    assert_eq!(c.list_all("/partners/acme/inbox").await?.len(), 7);
    let seg_dirs: Vec<_> = mailbox_testkit::files_under(&dc.segment_dir())
        .into_iter()
        .filter(|p| p.to_string_lossy().contains(&m.id))
        .collect();
    assert!(
        seg_dirs.is_empty(),
        "segments of deleted message remain: {seg_dirs:?}"
    );
    Ok(())
}
