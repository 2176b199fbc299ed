//! sluice's integration tests: one binary, the real server on port 0, a fake upstream that
//! records what it saw. `TEST_LOG=1` shows sluice's logs.

// Tests spawn servers and clients freely; the rule is for the request path in src/.
#![allow(clippy::disallowed_methods)]

mod admission;
mod agents;
mod anthropic;
mod browser;
mod budgets;
mod cancel;
mod chat;
mod cluster;
mod corpus;
mod failures;
mod faults;
mod hostile;
mod input;
mod js;
mod keys;
mod ledger;
#[cfg(feature = "local")]
mod local;
mod openai;
mod otel;
mod page;
mod pools;
mod readme;
mod reconnect;
mod responses;
mod resume;
mod resume_shared;
mod sdk;
mod shared;
mod spend;
mod startup;
mod support;
