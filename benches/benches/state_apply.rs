//! Criterion micro-benchmark: applying `PutMessage` commands to the state
//! machine in memory, the CPU cost every node pays per upload regardless of
//! disk. The baseline in the same run is a bare BTreeMap insert of the same
//! bytes, so the report reads as a ratio.

use std::collections::BTreeMap;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use mailbox_state::{apply, ApplyCtx, Command, MemKv, Overlay};
use mailbox_types::{Digest, MailboxPath, MessageId, MessageMeta, Payload};

fn put_cmd(i: u64) -> Command {
    Command::PutMessage {
        meta: MessageMeta {
            id: MessageId::new(),
            mailbox: MailboxPath::parse("/bench").unwrap(),
            name: format!("f{i}"),
            size: 1024,
            sha256: Digest::of(&i.to_le_bytes()),
            created_ms: 1,
            origin_dc: "east".into(),
            attributes: BTreeMap::new(),
            payload: Payload::Inline,
        },
        inline: Some(vec![7u8; 1024]),
        idempotency_key: None,
    }
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("apply_put_1k");
    g.throughput(Throughput::Elements(1));
    g.bench_function("state_machine", |b| {
        let ctx = ApplyCtx::new("east");
        let mut kv = MemKv::default();
        let mut ov = Overlay::new();
        apply(
            &kv,
            &mut ov,
            &ctx,
            &Command::CreateMailbox {
                path: MailboxPath::parse("/bench").unwrap(),
                parents: false,
                created_ms: 1,
            },
        )
        .unwrap();
        kv.commit(ov);
        let mut i = 0;
        b.iter(|| {
            i += 1;
            let mut ov = Overlay::new();
            apply(&kv, &mut ov, &ctx, &put_cmd(i)).unwrap();
            kv.commit(ov);
        })
    });
    g.bench_function("baseline_btreemap_insert", |b| {
        let mut m = BTreeMap::new();
        let mut i = 0u64;
        b.iter(|| {
            i += 1;
            m.insert(MessageId::new().as_bytes().to_vec(), vec![7u8; 1024]);
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
