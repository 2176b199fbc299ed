//! Dispatch: from a model name to the pools that serve it ([`Routes`]), the choice of a
//! target in a pool with its health and room ([`pool`]), shared across instances through
//! Redis ([`shared`]), and the failover between targets with typed deadlines ([`upstream`]).

mod failover;
pub mod pool;
mod routes;
pub mod shared;
pub mod target;

pub use failover::{Dispatcher, Timeouts, Unsent, upstream, verdict};
pub use pool::{Balance, Pool, PoolSettings, Target};
pub use routes::{Plan, Route, Routes, Unavailable};
pub use target::TargetState;
