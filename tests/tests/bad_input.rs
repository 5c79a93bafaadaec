//! Bad input gets a clear error and leaves no partial message behind
//! (invariant 5): truncated and aborted uploads, wrong checksums, bad paths
//! and names, missing mailboxes.

use std::time::Duration;

use mailbox_client::PutOptions;
use mailbox_proto::v1::mailbox_client::MailboxClient;
use mailbox_proto::v1::{put_request, PutHeader, PutRequest};
use mailbox_testkit::{files_under, wait_for, DcOptions, TestDc};
use tonic::Code;

fn opts(mailbox: &str, name: &str) -> PutOptions {
    PutOptions {
        mailbox: mailbox.into(),
        name: name.into(),
        ..Default::default()
    }
}

fn chunk(n: usize) -> PutRequest {
    PutRequest {
        part: Some(put_request::Part::Chunk(vec![7u8; n].into())),
    }
}

fn header() -> PutRequest {
    PutRequest {
        part: Some(put_request::Part::Header(PutHeader {
            mailbox: "/inbox".into(),
            name: "partial".into(),
            ..Default::default()
        })),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aborted_uploads_leave_nothing_and_orphans_are_collected() -> anyhow::Result<()> {
    let mut dc = TestDc::start(DcOptions {
        orphan_grace: "2s".into(),
        gc_interval: "200ms".into(),
        propose_timeout: "1s".into(),
        ..Default::default()
    })
    .await?;
    let c = dc.client().await?;
    c.mkdir("/inbox", false).await?;
    let leader = dc.wait_leader(Duration::from_secs(10)).await?;
    let addr = dc.nodes[leader as usize - 1].addr.clone();

    // 1) Stream ends without a trailer (client closes cleanly mid-file).
    let mut raw = MailboxClient::connect(format!("http://{addr}")).await?;
    let msgs = vec![header(), chunk(1 << 20), chunk(1 << 20), chunk(1 << 20)];
    let err = raw.put(tokio_stream::iter(msgs)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("truncated"), "{}", err.message());

    // 2) Client disconnects abruptly mid-upload: the request future is
    // dropped while the stream still waits for more data.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(header()).await?;
    for _ in 0..3 {
        tx.send(chunk(1 << 20)).await?;
    }
    let mut raw2 = MailboxClient::connect(format!("http://{addr}")).await?;
    let call = tokio::spawn(async move {
        raw2.put(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
    });
    // Wait until the server has started writing segments, then cut the connection.
    let seg_dir = dc.segment_dir();
    wait_for(
        Duration::from_secs(10),
        "segments of the partial upload",
        || {
            let d = seg_dir.clone();
            async move { (!files_under(&d).is_empty()).then_some(()) }
        },
    )
    .await?;
    call.abort();
    drop(tx);

    // Nothing is visible, and the aborted uploads cleaned up after themselves.
    assert!(c.list_all("/inbox").await?.is_empty());
    wait_for(
        Duration::from_secs(5),
        "aborted upload's segments removed",
        || {
            let d = seg_dir.clone();
            async move { files_under(&d).is_empty().then_some(()) }
        },
    )
    .await?;

    // 3) The node taking the upload crashes between segment writes and the
    // commit: its segments are orphans that only the collector can remove.
    let follower = (1..=3).find(|&id| id != leader).unwrap();
    let faddr = dc.nodes[follower as usize - 1].addr.clone();
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(header()).await?;
    for _ in 0..3 {
        tx.send(chunk(1 << 20)).await?;
    }
    let mut raw3 = MailboxClient::connect(format!("http://{faddr}")).await?;
    let call = tokio::spawn(async move {
        raw3.put(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
    });
    wait_for(
        Duration::from_secs(10),
        "segments of the crashing upload",
        || {
            let d = seg_dir.clone();
            async move { (files_under(&d).len() >= 2).then_some(()) }
        },
    )
    .await?;
    dc.kill(follower);
    let _ = call.await;
    drop(tx);
    assert!(
        !files_under(&seg_dir).is_empty(),
        "the crash must leave orphans behind"
    );
    wait_for(
        Duration::from_secs(20),
        "orphaned segments collected by the leader",
        || {
            let d = seg_dir.clone();
            async move { files_under(&d).is_empty().then_some(()) }
        },
    )
    .await?;
    let c = dc.client().await?;
    assert!(c.list_all("/inbox").await?.is_empty());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_checksum_is_data_loss_and_stores_nothing() -> anyhow::Result<()> {
    let mut dc = TestDc::start(DcOptions::default()).await?;
    let c = dc.client().await?;
    c.mkdir("/inbox", false).await?;
    let wrong = "00".repeat(32);
    for len in [10usize, 3 << 20] {
        let mut o = opts("/inbox", "x");
        o.sha256 = Some(wrong.clone());
        let err = c.put_bytes(o, vec![1u8; len]).await.unwrap_err();
        assert_eq!(err.code(), Some(Code::DataLoss), "{err}");
        assert!(err.to_string().contains("checksum mismatch"), "{err}");
    }
    assert!(c.list_all("/inbox").await?.is_empty());
    assert!(
        files_under(&dc.segment_dir()).is_empty(),
        "segments left behind"
    );
    // The right checksum is accepted.
    let mut o = opts("/inbox", "x");
    o.sha256 = Some(mailbox_testkit::hex(
        &<sha2::Sha256 as sha2::Digest>::digest([1u8; 10]),
    ));
    c.put_bytes(o, vec![1u8; 10]).await?;
    // A malformed checksum is an argument error.
    let mut o = opts("/inbox", "y");
    o.sha256 = Some("xyz".into());
    assert_eq!(
        c.put_bytes(o, vec![1]).await.unwrap_err().code(),
        Some(Code::InvalidArgument)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_paths_names_and_missing_mailboxes() -> anyhow::Result<()> {
    let mut dc = TestDc::start(DcOptions::default()).await?;
    let c = dc.client().await?;
    c.mkdir("/inbox", false).await?;
    let long_path = format!("/{}", "a".repeat(1100));
    for bad in [
        "/a/../b",
        "/a//b",
        "relative",
        "/",
        "/a\0b",
        "/./x",
        long_path.as_str(),
    ] {
        let e = c.mkdir(bad, true).await.unwrap_err();
        assert_eq!(e.code(), Some(Code::InvalidArgument), "mkdir {bad:?}: {e}");
        let e = c
            .put_bytes(opts(bad, "f"), b"x".to_vec())
            .await
            .unwrap_err();
        assert_eq!(e.code(), Some(Code::InvalidArgument), "put {bad:?}: {e}");
        let e = c.list(bad, "", 10).await.unwrap_err();
        assert_eq!(e.code(), Some(Code::InvalidArgument), "ls {bad:?}: {e}");
    }
    let long_name = "n".repeat(256);
    for bad in ["", "..", "a/b", "a\0b", long_name.as_str()] {
        let e = c
            .put_bytes(opts("/inbox", bad), b"x".to_vec())
            .await
            .unwrap_err();
        assert_eq!(e.code(), Some(Code::InvalidArgument), "name {bad:?}: {e}");
    }
    // 255 bytes is fine.
    c.put_bytes(opts("/inbox", &"n".repeat(255)), b"x".to_vec())
        .await?;
    // Missing mailbox and parent.
    let e = c
        .put_bytes(opts("/nope", "f"), b"x".to_vec())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(Code::NotFound), "{e}");
    let e = c.mkdir("/missing/child", false).await.unwrap_err();
    assert_eq!(e.code(), Some(Code::NotFound), "{e}");
    let e = c.mkdir("/inbox", false).await.unwrap_err();
    assert_eq!(e.code(), Some(Code::AlreadyExists), "{e}");
    // Unknown and malformed ids.
    let e = c
        .stat("0190a0a0-0000-7000-8000-000000000000")
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(Code::NotFound));
    let e = c.stat("not-an-id").await.unwrap_err();
    assert_eq!(e.code(), Some(Code::InvalidArgument));
    // Only the one good message exists.
    assert_eq!(c.list_all("/inbox").await?.len(), 1);
    assert!(files_under(&dc.segment_dir()).is_empty());
    Ok(())
}

/// The one-message upload (`PutOne`, what clients use up to 1 MiB) checks
/// what `Put` checks: a request without a header or over its size cap is
/// refused, a wrong checksum of a segmented payload stores nothing, and a
/// good one is stored byte for byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_one_refuses_bad_requests_and_leaves_nothing() -> anyhow::Result<()> {
    use mailbox_proto::v1::PutOneRequest;
    let mut dc = TestDc::start(DcOptions::default()).await?;
    let c = dc.client().await?;
    c.mkdir("/inbox", false).await?;
    let leader = dc.wait_leader(Duration::from_secs(10)).await?;
    let addr = dc.nodes[leader as usize - 1].addr.clone();
    let mut raw = MailboxClient::connect(format!("http://{addr}"))
        .await?
        .max_encoding_message_size(64 << 20);
    let head = || PutHeader {
        mailbox: "/inbox".into(),
        name: "one".into(),
        ..Default::default()
    };
    let err = raw
        .put_one(PutOneRequest {
            header: None,
            data: vec![1u8; 10].into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("header"), "{}", err.message());
    let err = raw
        .put_one(PutOneRequest {
            header: Some(head()),
            data: vec![1u8; (4 << 20) + 1].into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("stream"), "{}", err.message());
    // Past the inline threshold: segments are written, then the checksum
    // fails and they go again.
    let err = raw
        .put_one(PutOneRequest {
            header: Some(PutHeader {
                sha256: "00".repeat(32),
                ..head()
            }),
            data: vec![2u8; 1 << 20].into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::DataLoss, "{err:?}");
    assert!(c.list_all("/inbox").await?.is_empty());
    assert!(
        files_under(&dc.segment_dir()).is_empty(),
        "segments left behind"
    );
    let data: Vec<u8> = (0..(1u32 << 20)).map(|i| (i % 251) as u8).collect();
    let r = raw
        .put_one(PutOneRequest {
            header: Some(head()),
            data: data.clone().into(),
        })
        .await?
        .into_inner();
    let id = r.message.expect("message").id;
    let mut got = Vec::new();
    c.get_to(&id, 0, 0, &mut got, |_, _| {}).await?;
    assert!(got == data, "downloaded bytes differ");
    Ok(())
}
