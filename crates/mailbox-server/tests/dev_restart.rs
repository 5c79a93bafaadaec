//! `mailboxd dev` supervises its nodes: a node killed with SIGKILL is
//! reported and restarted while the others keep running, and SIGTERM to
//! `dev` still stops every node.
//!
//! Runs the real binary with one DC of three nodes on free loopback ports.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mailbox_proto::v1::mailbox_client::MailboxClient;
use mailbox_proto::v1::ClusterStatusRequest;

/// Lines `dev` printed so far, stdout and stderr interleaved as read.
type Output = Arc<Mutex<Vec<String>>>;

/// The running `dev`, and the node pids it reported; on drop (a failed
/// assertion) everything is killed so no node outlives the test.
struct Dev {
    child: Child,
    out: Output,
    node_pids: Vec<u32>,
}

impl Drop for Dev {
    fn drop(&mut self) {
        for &pid in &self.node_pids {
            if alive(pid) {
                signal(pid, libc::SIGKILL);
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Dev {
    fn lines(&self) -> Vec<String> {
        self.out.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// Polls the output until a line satisfies `f`; fails with everything
    /// printed so far once `within` has passed.
    async fn wait_line(&self, within: Duration, what: &str, f: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + within;
        loop {
            if let Some(l) = self.lines().into_iter().find(|l| f(l)) {
                return l;
            }
            assert!(
                Instant::now() < deadline,
                "no {what} within {within:?}; dev printed:\n{}",
                self.lines().join("\n")
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: plain kill(2); the pids are node processes this test started
    // (through dev) and checks are still alive.
    unsafe {
        libc::kill(pid as libc::pid_t, sig);
    }
}

/// Running and not a zombie (dev reaps its children, but not instantly).
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // "pid (comm) S ...": the state follows the last ')'.
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with(['Z', 'X'])),
        Err(_) => false,
    }
}

fn cmdline(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .unwrap_or_default()
}

/// A base port whose east gRPC (+1..+3) and HTTP (+51..+53) ports are free,
/// starting at a pid-dependent block so parallel runs rarely race.
fn free_base_port() -> u16 {
    let blocks = (32000 - 17300) / 100;
    let first = std::process::id() % blocks;
    for b in 0..blocks {
        let base = 17300 + 100 * ((first + b) % blocks) as u16;
        let free = [1, 2, 3, 51, 52, 53]
            .iter()
            .all(|o| std::net::TcpListener::bind(("127.0.0.1", base + o)).is_ok());
        if free {
            return base;
        }
    }
    panic!("no free port block between 17300 and 32000");
}

fn read_lines(r: impl std::io::Read + Send + 'static, out: Output, tag: &'static str) {
    std::thread::spawn(move || {
        for line in BufReader::new(r).lines() {
            let Ok(line) = line else { break };
            eprintln!("[dev {tag}] {line}");
            if let Ok(mut v) = out.lock() {
                v.push(line);
            }
        }
    });
}

/// The pid printed on the banner line of node `id` ("  node 2  pid 1234 ...").
fn banner_pid(lines: &[String], id: u64) -> u32 {
    let prefix = format!("node {id}  pid ");
    lines
        .iter()
        .find_map(|l| l.trim_start().strip_prefix(&prefix))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no pid for node {id} in the banner:\n{}", lines.join("\n")))
}

async fn cluster_status_answers(addr: &str) -> bool {
    let Ok(mut c) = MailboxClient::connect(format!("http://{addr}")).await else {
        return false;
    };
    c.cluster_status(ClusterStatusRequest::default())
        .await
        .is_ok_and(|s| s.into_inner().has_leader)
}

#[tokio::test]
async fn a_killed_node_is_restarted_and_the_others_keep_running() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let base = free_base_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_mailboxd"))
        .arg("dev")
        .arg("--dir")
        .arg(root)
        .args(["--dcs", "east", "--nodes", "3", "--base-port"])
        .arg(base.to_string())
        .arg("--client-config")
        .arg(root.join("client.toml"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start mailboxd dev");
    let out = Output::default();
    read_lines(child.stdout.take().expect("stdout"), out.clone(), "out");
    read_lines(child.stderr.take().expect("stderr"), out.clone(), "err");
    let mut dev = Dev {
        child,
        out,
        node_pids: vec![],
    };

    dev.wait_line(Duration::from_secs(60), "banner", |l| {
        l.contains("Press Ctrl-C")
    })
    .await;
    dev.wait_line(Duration::ZERO, "restart hint", |l| {
        l.contains("kill -9") && l.contains("restarted after 3s") && l.contains("--no-restart")
    })
    .await;
    let lines = dev.lines();
    let pids: Vec<u32> = (1..=3).map(|id| banner_pid(&lines, id)).collect();
    dev.node_pids.extend(&pids);
    for (i, &pid) in pids.iter().enumerate() {
        let cfg = root.join(format!("east/node{}/node.toml", i + 1));
        assert!(alive(pid), "node {} (pid {pid}) not running", i + 1);
        assert!(
            cmdline(pid).contains(&*cfg.to_string_lossy()),
            "pid {pid} is not node {}: {}",
            i + 1,
            cmdline(pid)
        );
    }
    let log = root.join("east/node2/mailboxd.log");
    let log_before = std::fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
    assert!(log_before > 0, "node 2 logged nothing");

    let old = pids[1];
    signal(old, libc::SIGKILL);
    let notice = dev
        .wait_line(Duration::from_secs(10), "death notice", |l| {
            l.contains("east node 2") && l.contains(&format!("pid {old}"))
        })
        .await;
    assert!(notice.contains("SIGKILL"), "{notice}");
    assert!(notice.contains("restarting it in 3s"), "{notice}");
    for (id, pid) in [(1, pids[0]), (3, pids[2])] {
        assert!(alive(pid), "node {id} (pid {pid}) stopped with node 2");
    }

    let restarted = dev
        .wait_line(Duration::from_secs(30), "restart of node 2", |l| {
            l.starts_with("east node 2 restarted (pid ")
        })
        .await;
    let new: u32 = restarted
        .trim_start_matches("east node 2 restarted (pid ")
        .split(')')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no pid in {restarted:?}"));
    dev.node_pids.push(new);
    assert_ne!(new, old);
    assert!(alive(new), "restarted node 2 (pid {new}) not running");
    assert!(cmdline(new).contains(&*root.join("east/node2/node.toml").to_string_lossy()));

    // The restarted node serves again and sees a leader.
    let addr = format!("127.0.0.1:{}", base + 2);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cluster_status_answers(&addr).await {
        assert!(
            Instant::now() < deadline,
            "restarted node 2 at {addr} does not answer ClusterStatus with a leader"
        );
        assert!(alive(new), "restarted node 2 (pid {new}) died");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let log_text = std::fs::read_to_string(&log).expect("read node 2 log");
    assert!(
        log_text.len() as u64 > log_before && log_text.contains("restarted by `mailboxd dev`"),
        "node 2's log was not appended to"
    );
    assert!(alive(pids[0]) && alive(pids[2]));

    // SIGTERM to dev stops every node, then dev itself.
    signal(dev.child.id(), libc::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = dev.child.try_wait().expect("wait for dev") {
            break s;
        }
        assert!(Instant::now() < deadline, "dev did not exit after SIGTERM");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(status.success(), "dev exited with {status}");
    dev.wait_line(Duration::from_secs(2), "stop message", |l| {
        l == "All nodes stopped."
    })
    .await;
    for pid in [pids[0], new, pids[2]] {
        assert!(!alive(pid), "node pid {pid} outlived dev");
    }
    // Keep `dir` until here: the nodes wrote into it.
    assert!(Path::new(root).exists());
}
