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
use tokio::task::JoinHandle;

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
                if st.cut.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let target = target.clone();
                let st2 = st.clone();
                let h = tokio::spawn(async move {
                    let Ok(outbound) = TcpStream::connect(&target).await else {
                        return;
                    };
                    let _ = inbound.set_nodelay(true);
                    let _ = outbound.set_nodelay(true);
                    let (ri, wi) = inbound.into_split();
                    let (ro, wo) = outbound.into_split();
                    let a = pump(ri, wo, st2.clone(), false);
                    let b = pump(ro, wi, st2, true);
                    let _ = tokio::join!(a, b);
                });
                st.conns.lock().expect("lock").push(h);
            }
        });
        Ok(Self { listen, state })
    }

    /// Closes every connection and refuses new ones.
    pub fn cut(&self) {
        self.state.cut.store(true, Ordering::SeqCst);
        for h in self.state.conns.lock().expect("lock").drain(..) {
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

    /// Delays every forwarded chunk by `d` (one way).
    pub fn set_delay(&self, d: Duration) {
        self.state
            .delay_ms
            .store(d.as_millis() as u64, Ordering::SeqCst);
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    st: Arc<ProxyState>,
    downstream: bool,
) {
    let mut buf = vec![0u8; 64 << 10];
    let mut seen = 0u64;
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
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
        let delay = st.delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        if st.cut.load(Ordering::SeqCst) || to.write_all(&buf[..n]).await.is_err() {
            return;
        }
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

    /// Adds one-way delay `d` on every inter-DC proxy (RTT = 2d).
    pub fn set_delay(&self, d: Duration) {
        self.links.values().flatten().for_each(|p| p.set_delay(d));
    }
}
