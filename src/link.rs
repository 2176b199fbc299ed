//! The link to Redis every shared part uses (limits, pools, stream logs): one server, or a
//! Redis Cluster when `SLUICE_REDIS_URL` names several seed nodes. Each user opens its own
//! connection on it with its own response timeout, so a burst of stream writes never queues
//! an admission behind it. A Cluster connection follows `MOVED`/`ASK` and topology changes
//! by itself (redis-rs' cluster-async client); a subscription goes to any one node, since a
//! Cluster forwards every `PUBLISH` to all of them.

use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig, PubSub};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{Client, Cmd, Pipeline, RedisFuture, RedisResult, Value};
use tokio::sync::OnceCell;

/// How long connecting to a node may take.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

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

    pub fn is_cluster(&self) -> bool {
        self.nodes.len() > 1
    }

    /// A multiplexed connection, answering within `response` or failing.
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
        let cluster = ClusterClient::builder(seeds)
            .connection_timeout(CONNECT_TIMEOUT)
            .response_timeout(response)
            .retries(3)
            .min_retry_wait(10)
            .max_retry_wait(200)
            .build()?;
        Ok(Connection::Cluster(cluster.get_async_connection().await?))
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
#[derive(Clone)]
pub enum Connection {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Connection::Single(c) => c.req_packed_command(cmd),
            Connection::Cluster(c) => c.req_packed_command(cmd),
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
            Connection::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Connection::Single(c) => c.get_db(),
            Connection::Cluster(c) => c.get_db(),
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
