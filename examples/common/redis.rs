//! Redis of a test's or example's own: one redis-server, or a Cluster of three primaries
//! with a replica each (`redis-server --cluster-enabled yes`, joined by
//! `redis-cli --cluster create`), on free loopback ports; stopped by their pids when
//! dropped. Included by the API tests and by `chaos.rs` with `#[path]`; not an example of
//! its own.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a node may take to answer, or a cluster to form.
const START: Duration = Duration::from_secs(20);

pub struct Redis {
    nodes: Vec<Node>,
    /// What `SLUICE_REDIS_URL` is set to: one URL, or every node's, comma-separated.
    pub url: String,
    dir: Option<std::path::PathBuf>,
}

struct Node {
    /// None once killed.
    child: Option<Child>,
    port: u16,
}

/// Whether each of `tools` runs here.
pub fn available(tools: &[&str]) -> bool {
    tools.iter().all(|tool| {
        Command::new(tool)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

impl Node {
    /// A redis-server on `port`; `None` when it exits before answering (its port, or its
    /// cluster bus port, was taken meanwhile by something else on a busy machine).
    fn start(port: u16, extra: &[&str]) -> Option<Node> {
        let mut child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server starts");
        let started = Instant::now();
        while !ping(port) {
            if child.try_wait().ok().flatten().is_some() {
                return None;
            }
            assert!(started.elapsed() < START, "redis-server did not answer");
            std::thread::sleep(Duration::from_millis(10));
        }
        Some(Node {
            child: Some(child),
            port,
        })
    }

    /// A node started on free ports, `extra(port, bus port)` its settings: tried again on
    /// other ports when one exits at start.
    fn start_free(extra: impl Fn(u16, u16) -> Vec<String>) -> Node {
        for _ in 0..5 {
            let (port, bus) = (free_port(), free_port());
            let extra = extra(port, bus);
            let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
            if let Some(node) = Node::start(port, &extra) {
                return node;
            }
        }
        panic!("redis-server exited at start five times (ports taken?)");
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Redis {
    pub fn single() -> Redis {
        let node = Node::start_free(|_, _| Vec::new());
        Redis {
            url: format!("redis://127.0.0.1:{}", node.port),
            nodes: vec![node],
            dir: None,
        }
    }

    /// Three primaries and three replicas; a replica takes over from a dead primary
    /// within a few seconds (`cluster-node-timeout 2000`).
    pub fn cluster() -> Redis {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("sluice-redis-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a directory for the nodes' files");
        let nodes: Vec<Node> = (0..6)
            .map(|_| {
                Node::start_free(|port, bus| {
                    let conf = dir.join(format!("nodes-{port}.conf"));
                    [
                        "--cluster-enabled",
                        "yes",
                        "--cluster-port",
                        &bus.to_string(),
                        "--cluster-config-file",
                        &conf.to_string_lossy(),
                        "--cluster-node-timeout",
                        "2000",
                        "--dir",
                        &dir.to_string_lossy(),
                    ]
                    .map(str::to_owned)
                    .to_vec()
                })
            })
            .collect();
        let addresses: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let created = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addresses)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .output()
            .expect("redis-cli runs");
        assert!(
            created.status.success(),
            "redis-cli --cluster create: {}",
            String::from_utf8_lossy(&created.stdout)
        );
        let redis = Redis {
            url: addresses
                .iter()
                .map(|a| format!("redis://{a}"))
                .collect::<Vec<_>>()
                .join(","),
            nodes,
            dir: Some(dir),
        };
        let started = Instant::now();
        while !redis.whole() {
            assert!(started.elapsed() < START, "the cluster never came up");
            std::thread::sleep(Duration::from_millis(50));
        }
        redis
    }

    /// The first node's process id (the one server's).
    pub fn pid(&self) -> Option<u32> {
        self.nodes.first()?.child.as_ref().map(Child::id)
    }

    pub fn kill(&mut self) {
        for node in &mut self.nodes {
            node.kill();
        }
    }

    /// Kills the node on `port` (SIGKILL).
    pub fn kill_node(&mut self, port: u16) {
        if let Some(node) = self.nodes.iter_mut().find(|n| n.port == port) {
            node.kill();
        }
    }

    /// Every live node sees every slot served, and each primary with a replica in sync.
    pub fn whole(&self) -> bool {
        self.nodes
            .iter()
            .filter(|n| n.child.is_some())
            .all(|n| node_ready(n.port))
    }

    /// The port of the primary serving `key`'s slot, as a live node sees it.
    pub fn primary_of(&self, key: &str) -> Option<u16> {
        let port = self.nodes.iter().find(|n| n.child.is_some())?.port;
        let slot: u16 = cli(port, &["CLUSTER", "KEYSLOT", key])
            .trim()
            .parse()
            .ok()?;
        // `id addr@bus flags master-id ping pong epoch state slot-ranges...`
        let nodes = cli(port, &["CLUSTER", "NODES"]);
        nodes.lines().find_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 9 || !fields[2].contains("master") || fields[2].contains("fail") {
                return None;
            }
            let serves = fields[8..].iter().any(|range| {
                let mut ends = range.split('-').map(|n| n.parse::<u16>().ok());
                match (ends.next().flatten(), ends.next().flatten()) {
                    (Some(low), Some(high)) => (low..=high).contains(&slot),
                    (Some(one), None) => one == slot,
                    _ => false,
                }
            });
            serves.then(|| {
                fields[1]
                    .split('@')
                    .next()?
                    .rsplit(':')
                    .next()?
                    .parse()
                    .ok()
            })?
        })
    }

    /// Whether another node than `dead` serves `key`'s slot now, in a whole cluster.
    pub fn failed_over(&self, key: &str, dead: u16) -> bool {
        let live: Vec<u16> = self
            .nodes
            .iter()
            .filter(|n| n.child.is_some())
            .map(|n| n.port)
            .collect();
        live.iter().all(|&p| {
            let info = cli(p, &["CLUSTER", "INFO"]);
            info.contains("cluster_state:ok")
        }) && self.primary_of(key).is_some_and(|p| p != dead)
    }

    /// Scripts each live node has run (`EVALSHA` and `EVAL` calls), by port.
    pub fn scripts_run(&self) -> Vec<(u16, u64)> {
        self.nodes
            .iter()
            .filter(|n| n.child.is_some())
            .map(|n| {
                let stats = cli(n.port, &["INFO", "commandstats"]);
                let calls = stats
                    .lines()
                    .filter(|l| l.starts_with("cmdstat_evalsha:") || l.starts_with("cmdstat_eval:"))
                    .filter_map(|l| {
                        l.split("calls=")
                            .nth(1)?
                            .split(',')
                            .next()?
                            .parse::<u64>()
                            .ok()
                    })
                    .sum();
                (n.port, calls)
            })
            .collect()
    }

    /// Memory Redis uses, in bytes, summed over the live nodes.
    pub fn used_memory(&self) -> u64 {
        self.nodes
            .iter()
            .filter(|n| n.child.is_some())
            .map(|n| {
                cli(n.port, &["INFO", "memory"])
                    .lines()
                    .find_map(|l| l.strip_prefix("used_memory:"))
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .unwrap_or(0)
            })
            .sum()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
        if let Some(dir) = &self.dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

fn ping(port: u16) -> bool {
    let Ok(mut tcp) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let mut reply = [0u8; 7];
    tcp.write_all(b"PING\r\n").is_ok()
        && tcp.read_exact(&mut reply).is_ok()
        && &reply == b"+PONG\r\n"
}

fn cli(port: u16, args: &[&str]) -> String {
    Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).into_owned())
        .unwrap_or_default()
}

/// This node sees every slot served, and is a primary with a replica or a synced replica.
fn node_ready(port: u16) -> bool {
    let info = cli(port, &["CLUSTER", "INFO"]);
    if !info.contains("cluster_state:ok") || !info.contains("cluster_slots_ok:16384") {
        return false;
    }
    let replication = cli(port, &["INFO", "replication"]);
    (replication.contains("role:master") && replication.contains("connected_slaves:1"))
        || replication.contains("master_link_status:up")
}
