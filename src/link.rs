//! The link to Redis every shared part uses (limits, pools, stream logs): one server, or a
//! Redis Cluster when `SLUICE_REDIS_URL` names several seed nodes. Each user opens its own
//! connection on it with its own response timeout, so a burst of stream writes never queues
//! an admission behind it. A Cluster connection follows `MOVED`/`ASK` and topology changes
//! by itself (redis-rs' cluster-async client); a subscription goes to any one node, since a
//! Cluster forwards every `PUBLISH` to all of them.
//!
//! One thing the Cluster client does not do by itself: recover under load from a primary's
//! death. With a few hundred requests in flight when a primary is killed, redis-rs 0.32's
//! connection stops answering anything (every slot, not only the dead primary's) and stays
//! so after its replica has taken over (`examples/chaos.rs` shows it). So a request that
//! fails for want of a node marks the connection stale, and the next request builds a new
//! one from the seed nodes, at most once a second; a fresh connection finds the new
//! primaries at once.

use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig, PubSub};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{Client, Cmd, Pipeline, RedisError, RedisFuture, RedisResult, Value};
use tokio::sync::OnceCell;

/// How long connecting to a node may take.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
/// How long building a Cluster connection (finding the slots) may take.
const DISCOVERY_TIMEOUT: Duration = Duration::from_secs(2);
/// The least time between two rebuilds of a Cluster connection.
const REBUILD_AFTER: Duration = Duration::from_secs(1);

/// Where Redis is: one server, or the seed nodes of a Cluster.
#[derive(Clone)]
pub struct Link {
    /// One client per URL given: the server, or each seed node.
    nodes: Vec<Client>,
}

impl Link {
    /// `urls`: one `redis://` URL, or several, comma-separated, for a Cluster.
    pub fn open(urls: &str) -> anyhow::Result<Link> {
        let nodes = urls
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(Client::open)
            .collect::<RedisResult<Vec<_>>>()?;
        anyhow::ensure!(!nodes.is_empty(), "no Redis URL given");
        Ok(Link { nodes })
    }

    /// A multiplexed connection, answering within `response` or failing. To a Cluster, it
    /// is made on its first request.
    pub async fn connect(&self, response: Duration) -> RedisResult<Connection> {
        if let [node] = self.nodes.as_slice() {
            let config = ConnectionManagerConfig::new()
                .set_connection_timeout(CONNECT_TIMEOUT)
                .set_response_timeout(response)
                .set_number_of_retries(1);
            let manager = ConnectionManager::new_with_config(node.clone(), config).await?;
            return Ok(Connection::Single(manager));
        }
        let seeds = self.nodes.iter().map(|c| c.get_connection_info().clone());
        // A few quick retries carry a request across a redirection or a node's restart; a
        // failover takes seconds, and each user decides itself how long to wait for one.
        let client = ClusterClient::builder(seeds)
            .connection_timeout(CONNECT_TIMEOUT)
            .response_timeout(response)
            .retries(3)
            .min_retry_wait(10)
            .max_retry_wait(200)
            .build()?;
        Ok(Connection::Cluster(Arc::new(Cluster {
            client,
            current: tokio::sync::Mutex::new(Current {
                connection: None,
                since: Instant::now(),
            }),
        })))
    }

    /// A subscription on one node: the `attempt`-th seed, so that a caller retrying after a
    /// failure tries the next one.
    pub async fn pubsub(&self, attempt: usize) -> RedisResult<PubSub> {
        self.nodes[attempt % self.nodes.len()]
            .get_async_pubsub()
            .await
    }
}

/// A connection to one server or to a Cluster: either runs commands, pipelines and scripts.
/// Clones share one connection (and its rebuilds).
#[derive(Clone)]
pub enum Connection {
    Single(ConnectionManager),
    Cluster(Arc<Cluster>),
}

/// A Cluster connection, built again when it has gone stale.
pub struct Cluster {
    client: ClusterClient,
    current: tokio::sync::Mutex<Current>,
}

struct Current {
    connection: Option<ClusterConnection>,
    /// When it was built (or last failed to be).
    since: Instant,
}

impl Cluster {
    async fn connection(&self) -> RedisResult<ClusterConnection> {
        let mut current = self.current.lock().await;
        if let Some(connection) = &current.connection {
            return Ok(connection.clone());
        }
        current.since = Instant::now();
        let built = tokio::time::timeout(DISCOVERY_TIMEOUT, self.client.get_async_connection())
            .await
            .map_err(|_| {
                RedisError::from((
                    redis::ErrorKind::IoError,
                    "no seed node of the Redis Cluster answered",
                ))
            })??;
        current.connection = Some(built.clone());
        Ok(built)
    }

    /// After a failed request: a failure for want of a node makes the next request build
    /// a new connection, unless this one is younger than [`REBUILD_AFTER`].
    async fn failed(&self, error: &RedisError) {
        let node = error.is_io_error()
            || error.is_timeout()
            || error.is_connection_dropped()
            || error.is_connection_refusal()
            || error.is_cluster_error()
            || error.kind() == redis::ErrorKind::ClusterDown;
        let mut current = self.current.lock().await;
        if node && current.since.elapsed() >= REBUILD_AFTER {
            current.connection = None;
        }
    }
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Connection::Single(c) => c.req_packed_command(cmd),
            Connection::Cluster(cluster) => Box::pin(async move {
                let result = cluster.connection().await?.req_packed_command(cmd).await;
                if let Err(e) = &result {
                    cluster.failed(e).await;
                }
                result
            }),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Connection::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Connection::Cluster(cluster) => Box::pin(async move {
                let result = cluster
                    .connection()
                    .await?
                    .req_packed_commands(pipeline, offset, count)
                    .await;
                if let Err(e) = &result {
                    cluster.failed(e).await;
                }
                result
            }),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Connection::Single(c) => c.get_db(),
            Connection::Cluster(_) => 0,
        }
    }
}

/// A connection opened on first use and kept (it reconnects by itself); a first connect
/// that fails is tried again on the next use.
pub struct Lazy {
    link: Link,
    response: Duration,
    connection: OnceCell<Connection>,
}

impl Lazy {
    pub fn new(link: Link, response: Duration) -> Lazy {
        Lazy {
            link,
            response,
            connection: OnceCell::new(),
        }
    }

    pub fn link(&self) -> &Link {
        &self.link
    }

    pub async fn get(&self) -> RedisResult<Connection> {
        self.connection
            .get_or_try_init(|| self.link.connect(self.response))
            .await
            .cloned()
    }
}
