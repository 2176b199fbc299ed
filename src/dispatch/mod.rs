//! Dispatch: from a model name to the backends that serve it ([`Routes`]), and the
//! failover between them with typed deadlines ([`upstream`]).

mod failover;
mod routes;

pub use failover::{Dispatcher, Timeouts, upstream};
pub use routes::{Route, Routes, Target};
