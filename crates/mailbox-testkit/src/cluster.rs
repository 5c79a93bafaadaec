//! Multi-DC test clusters whose inter-DC links run through user-space TCP
//! proxies, so a test can cut a link, heal it, or add delay (this kernel has
//! no `tc netem`).
//!
//! Every DC reaches every other DC only through proxies: DC A's config lists
//! DC B's endpoints as the ports of proxies A→B, one per node of B. Cutting
//! the link A↔B closes every open connection of the proxies A→B and B→A and
//! refuses new ones until healed.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::{free_addrs, DcOptions, TestDc};

#[derive(Default)]
struct ProxyState {
    cut: AtomicBool,
    delay_ms: AtomicU64,
    /// When non-zero: flip one bit of the byte at this offset of the next
    /// connection's server-to-client stream that gets that far, once.
    corrupt_at: AtomicU64,
    conns: Mutex<Vec<JoinHandle<()>>>,
}

/// A TCP proxy from a local port to one node.
#[derive(Clone)]
pub struct LinkProxy {
    /// `127.0.0.1:port` clients connect to.
    pub listen: String,
    state: Arc<ProxyState>,
}

impl LinkProxy {
    /// Starts a proxy forwarding to `target`.
    pub async fn start(target: String) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let listen = listener.local_addr()?.to_string();
        let state = Arc::new(ProxyState::default());
        let st = state.clone();
        tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                // Decide under the lock `cut` drains: a connection accepted
                // while the link is being cut is either refused here or
                // registered before the drain, never left running.
                let mut conns = st.conns.lock().expect("lock");
                if st.cut.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let target = target.clone();
                let st2 = st.clone();
                // The handshake's round trip: through a link of one-way
                // delay d the client's connect returns after 2d and its
                // first bytes arrive at 3d, the server accepts at 3d and
                // its first bytes arrive at 4d. Here both ends connect at
                // once, so the first bytes are held back until then.
                let d = Duration::from_millis(st.delay_ms.load(Ordering::SeqCst));
                let opened = Instant::now();
                let h = tokio::spawn(async move {
                    let Ok(outbound) = TcpStream::connect(&target).await else {
                        return;
                    };
                    let _ = inbound.set_nodelay(true);
                    let _ = outbound.set_nodelay(true);
                    let (ri, wi) = inbound.into_split();
                    let (ro, wo) = outbound.into_split();
                    let a = pump(ri, wo, st2.clone(), false, opened + 3 * d);
                    let b = pump(ro, wi, st2, true, opened + 4 * d);
                    let _ = tokio::join!(a, b);
                });
                conns.push(h);
            }
        });
        Ok(Self { listen, state })
    }

    /// Closes every connection and refuses new ones.
    pub fn cut(&self) {
        let mut conns = self.state.conns.lock().expect("lock");
        self.state.cut.store(true, Ordering::SeqCst);
        for h in conns.drain(..) {
            h.abort();
        }
    }

    /// Accepts connections again.
    pub fn heal(&self) {
        self.state.cut.store(false, Ordering::SeqCst);
    }

    /// Flips one bit at byte `offset` of the next server-to-client stream
    /// that reaches it (once), emulating corruption in transit.
    pub fn corrupt_once_at(&self, offset: u64) {
        self.state.corrupt_at.store(offset, Ordering::SeqCst);
    }

    /// Delays every forwarded byte by `d` in each direction (one-way
    /// latency; a round trip through the proxy takes `2 d`). Chunks are
    /// pipelined, so bandwidth is not reduced.
    pub fn set_delay(&self, d: Duration) {
        self.state
            .delay_ms
            .store(d.as_millis() as u64, Ordering::SeqCst);
    }
}

/// Bytes a proxy direction holds in flight (read, not yet written): like
/// a link's buffer, it bounds memory and lets TCP flow control push back on
/// the sender. 32 MiB covers the bandwidth-delay product of a 1 GB/s link at
/// 30 ms one-way delay, so the delay does not cap throughput on loopback.
const IN_FLIGHT: usize = 32 << 20;
/// Largest chunk read at once.
const CHUNK: usize = 64 << 10;

/// Forwards `from` to `to`. With a delay, every chunk is written `delay`
/// after it was read (and not before `not_before`), while later chunks are
/// read meanwhile: the delay is pipelined like a real link's latency and
/// does not cap bandwidth (a sleep before each write would limit a stream
/// to one buffer per delay).
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    st: Arc<ProxyState>,
    downstream: bool,
    not_before: Instant,
) {
    let budget = Arc::new(Semaphore::new(IN_FLIGHT));
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>, OwnedSemaphorePermit)>();
    let reader_st = st.clone();
    let reader = async move {
        let st = reader_st;
        let mut seen = 0u64;
        let mut read_buf = vec![0u8; CHUNK];
        loop {
            let Ok(mut permit) = budget.clone().acquire_many_owned(CHUNK as u32).await else {
                return;
            };
            let n = match from.read(&mut read_buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            // Only what was read counts against the in-flight budget.
            drop(permit.split(CHUNK - n));
            let mut buf = read_buf[..n].to_vec();
            if downstream {
                let at = st.corrupt_at.load(Ordering::SeqCst);
                if at != 0
                    && seen <= at
                    && at < seen + n as u64
                    && st
                        .corrupt_at
                        .compare_exchange(at, 0, Ordering::SeqCst, Ordering::SeqCst)
                        .is_ok()
                {
                    buf[(at - seen) as usize] ^= 0x01;
                }
                seen += n as u64;
            }
            let delay = Duration::from_millis(st.delay_ms.load(Ordering::SeqCst));
            let due = (Instant::now() + delay).max(not_before);
            if tx.send((due, buf, permit)).is_err() {
                return;
            }
        }
    };
    let writer = async {
        while let Some((due, buf, permit)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if st.cut.load(Ordering::SeqCst) || to.write_all(&buf).await.is_err() {
                return;
            }
            drop(permit);
        }
        // The reader saw EOF: pass the half-close on.
        let _ = to.shutdown().await;
    };
    // The reader ending (EOF) drops the sender, so the writer drains what
    // is in flight and ends; the writer ending (write error, cut) drops the
    // reader too.
    tokio::select! {
        _ = async { reader.await; std::future::pending::<()>().await } => {}
        _ = writer => {}
    }
}

/// Several DCs wired together through [`LinkProxy`]s.
pub struct TestCluster {
    /// DCs by name.
    pub dcs: BTreeMap<String, TestDc>,
    /// Proxies by (from DC, to DC).
    links: BTreeMap<(String, String), Vec<LinkProxy>>,
}

impl TestCluster {
    /// Starts one DC per name with `opts` and `cluster_extra` (e.g.
    /// `ack = "immediate"`) in each `[cluster]` section.
    pub async fn start(
        names: &[&str],
        opts: DcOptions,
        cluster_extra: &str,
    ) -> anyhow::Result<Self> {
        let addrs: BTreeMap<String, Vec<String>> = names
            .iter()
            .map(|n| Ok((n.to_string(), free_addrs(opts.nodes)?)))
            .collect::<anyhow::Result<_>>()?;
        let mut links = BTreeMap::new();
        for from in names {
            for to in names.iter().filter(|t| *t != from) {
                let mut proxies = Vec::new();
                for target in &addrs[*to] {
                    proxies.push(LinkProxy::start(target.clone()).await?);
                }
                links.insert((from.to_string(), to.to_string()), proxies);
            }
        }
        let mut dcs = BTreeMap::new();
        for name in names {
            let mut toml = format!("[cluster]\n{cluster_extra}\n");
            for other in names.iter().filter(|o| *o != name) {
                let eps: Vec<String> = links[&(name.to_string(), other.to_string())]
                    .iter()
                    .map(|p| format!("\"{}\"", p.listen))
                    .collect();
                toml.push_str(&format!(
                    "[[cluster.remotes]]\nname = \"{other}\"\nendpoints = [{}]\n",
                    eps.join(", ")
                ));
            }
            let dc = TestDc::launch(name, &opts, addrs[*name].clone(), &toml).await?;
            dcs.insert(name.to_string(), dc);
        }
        Ok(Self { dcs, links })
    }

    /// The DC called `name`.
    pub fn dc(&mut self, name: &str) -> &mut TestDc {
        self.dcs.get_mut(name).expect("known DC")
    }

    fn pair(&self, a: &str, b: &str) -> impl Iterator<Item = &LinkProxy> {
        let ab = self
            .links
            .get(&(a.to_string(), b.to_string()))
            .into_iter()
            .flatten();
        let ba = self
            .links
            .get(&(b.to_string(), a.to_string()))
            .into_iter()
            .flatten();
        ab.chain(ba)
    }

    /// Cuts the link between DCs `a` and `b`, both directions.
    pub fn cut(&self, a: &str, b: &str) {
        self.pair(a, b).for_each(LinkProxy::cut);
    }

    /// Restores the link between `a` and `b`.
    pub fn heal(&self, a: &str, b: &str) {
        self.pair(a, b).for_each(LinkProxy::heal);
    }

    /// Cuts DC `a` off from every other DC.
    pub fn isolate(&self, a: &str) {
        for b in self.dcs.keys().filter(|b| b.as_str() != a) {
            self.cut(a, b);
        }
    }

    /// Reconnects DC `a` to every other DC.
    pub fn rejoin(&self, a: &str) {
        for b in self.dcs.keys().filter(|b| b.as_str() != a) {
            self.heal(a, b);
        }
    }

    /// Flips one bit at `offset` of the next response stream from DC `to`
    /// to DC `from` that gets that far (once per proxy).
    pub fn corrupt_once(&self, from: &str, to: &str, offset: u64) {
        if let Some(ps) = self.links.get(&(from.to_string(), to.to_string())) {
            ps.iter().for_each(|p| p.corrupt_once_at(offset));
        }
    }

    /// Addresses of the proxies DC `from` uses to reach DC `to`, one per
    /// node of `to`: a client connected there sees `to` through the same
    /// emulated link as `from`'s replicator does.
    pub fn link_endpoints(&self, from: &str, to: &str) -> Vec<String> {
        self.links
            .get(&(from.to_string(), to.to_string()))
            .into_iter()
            .flatten()
            .map(|p| p.listen.clone())
            .collect()
    }

    /// Adds one-way delay `d` on every inter-DC proxy (RTT = 2d).
    pub fn set_delay(&self, d: Duration) {
        self.links.values().flatten().for_each(|p| p.set_delay(d));
    }
}
