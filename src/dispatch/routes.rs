//! The model table: which pools a model name goes to, in order (the route's own, then its
//! fallbacks), with the default upstream's own model list (for `/v1/models` and bounded
//! metric labels), the shared readiness probes of every upstream, and the table's reload.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use super::pool::{Lease, NoRoom, Pool, Target, Waitlist};
use super::shared::SharedPools;
use super::target::{self, Registry, TargetState, Who};
use crate::backend::mock;
use crate::backend::{Backend, Probe};

/// Where a model name goes: its pool, then its fallbacks' (each a pool, mostly of one),
/// tried in order while nothing has been sent to the client.
pub struct Route {
    pub pools: Vec<Arc<Pool>>,
    /// The key variables, unset where sluice runs, whose upstreams were left out of the
    /// route; with no pool left, the route is off and a request for it is told which.
    pub unset: Vec<String>,
}

/// Why a request could not be given an upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unavailable {
    /// Every target is at its `max_streams` and the queue is full or the wait ran out: try
    /// again after this long.
    Full(Duration),
    /// Every target is ejected for failing; the first is back in this long.
    Down(Duration),
}

impl Route {
    /// A route of one upstream with no cap.
    pub fn to(
        backend: Arc<dyn Backend>,
        model: Option<String>,
        state: Arc<TargetState>,
    ) -> Arc<Self> {
        Arc::new(Route {
            pools: vec![Pool::single(Target::new(backend, model, state))],
            unset: Vec::new(),
        })
    }

    /// The key variables that leave this route with no upstream, when they do: every one
    /// of its upstreams names a variable that is not set.
    pub fn off(&self) -> Option<&[String]> {
        self.pools.is_empty().then_some(self.unset.as_slice())
    }

    /// The route's first target: the API it speaks decides how a request is relayed.
    pub fn first(&self) -> Option<&Target> {
        self.pools.first().and_then(|p| p.targets.first())
    }

    /// The upstream `who`'s request starts on, holding its slot, and the way on from it: a
    /// target of the route's pool (waiting in its queue while every target is full), else,
    /// when they are all ejected, of a fallback.
    pub async fn begin(self: &Arc<Self>, who: Who) -> Result<(Plan, Lease), Unavailable> {
        let Some(first) = self.pools.first() else {
            return Err(Unavailable::Down(Duration::from_secs(1)));
        };
        let down = match first.wait(who).await {
            Ok(lease) => return Ok((self.plan(0, &lease), lease)),
            Err((NoRoom::Full, wait)) => return Err(Unavailable::Full(wait)),
            Err((NoRoom::Down(back), _)) => back,
        };
        for (i, pool) in self.pools.iter().enumerate().skip(1) {
            if let Ok(lease) = pool.lease(&mut 0, who).await {
                return Ok((self.plan(i, &lease), lease));
            }
        }
        Err(Unavailable::Down(down))
    }

    fn plan(self: &Arc<Self>, pool: usize, lease: &Lease) -> Plan {
        Plan {
            route: self.clone(),
            pool,
            tried: 1 << lease.index(),
            who: lease.who(),
        }
    }
}

/// A request's way on through its route after the upstream it started on: each time one
/// fails before the first byte, another target of the same pool, then the fallbacks'.
pub struct Plan {
    route: Arc<Route>,
    pool: usize,
    /// The targets of the current pool tried so far, a bit each.
    tried: u64,
    who: Who,
}

impl Plan {
    /// The next upstream to try, holding its slot; `None` when none is left.
    pub async fn next(&mut self) -> Option<Lease> {
        while let Some(pool) = self.route.pools.get(self.pool) {
            if let Ok(lease) = pool.lease(&mut self.tried, self.who).await {
                return Some(lease);
            }
            self.pool += 1;
            self.tried = 0;
        }
        None
    }

    /// Whether another upstream might be tried after the current one.
    pub fn more(&self) -> bool {
        self.route
            .pools
            .get(self.pool)
            .is_some_and(|p| p.untried(self.tried))
            || self.pool + 1 < self.route.pools.len()
    }
}

/// The most names a pattern route records as served (names come from clients).
const SERVED_NAMES: usize = 256;

/// How often the default upstream's model list is fetched again.
const CATALOGUE_EVERY: Duration = Duration::from_secs(300);

/// The routing table: configured names first, then the built-in mock models, then anything
/// else to the default upstream when one is configured. The configured names are read
/// again on a reload ([`Routes::replace`]); requests already routed keep what they had.
#[derive(Clone)]
pub struct Routes(Arc<Inner>);

struct Inner {
    /// The configured routes, as last loaded.
    named: RwLock<Arc<HashMap<String, Arc<Route>>>>,
    /// Routes that do not come from the file (the local model): kept through reloads.
    fixed: HashMap<String, Arc<Route>>,
    mock: Arc<Route>,
    default_upstream: Option<Arc<dyn Backend>>,
    default_route: Option<Arc<Route>>,
    default_model: Arc<str>,
    /// The default upstream's own model list, as last fetched.
    catalogue: RwLock<Arc<HashSet<String>>>,
    /// The names each pattern route (`claude-*`) is known to serve: from its upstream's
    /// model list, and the names requests it served used (at most [`SERVED_NAMES`] each).
    pattern_names: RwLock<HashMap<String, HashSet<String>>>,
    /// The last readiness probe of every upstream: one probe at a time, shared by every
    /// caller, reused for a few seconds.
    probes: Mutex<Option<(Instant, SharedProbes)>>,
    /// Every target's state by its identity, through reloads.
    registry: Registry,
    shared: Option<Arc<SharedPools>>,
}

type SharedProbes = futures::future::Shared<futures::future::BoxFuture<'static, Arc<Vec<Probe>>>>;

/// How long one readiness probe of the upstreams serves.
const PROBES_SERVE: Duration = Duration::from_secs(5);

impl Routes {
    pub fn new(
        mock: Arc<dyn Backend>,
        default_upstream: Option<Arc<dyn Backend>>,
        fixed: HashMap<String, Arc<Route>>,
        default_model: String,
        shared: Option<Arc<SharedPools>>,
    ) -> Self {
        let registry = Registry::default();
        let default_route = default_upstream
            .as_ref()
            .map(|backend| Route::to(backend.clone(), None, registry.state("default", "default")));
        Routes(Arc::new(Inner {
            named: RwLock::default(),
            fixed,
            mock: Route::to(mock, None, registry.state("mock", "mock")),
            default_upstream,
            default_route,
            default_model: default_model.into(),
            catalogue: RwLock::default(),
            pattern_names: RwLock::default(),
            probes: Mutex::default(),
            registry,
            shared,
        }))
    }

    /// The state of the target `identity` names, the same through reloads.
    pub fn target_state(&self, identity: &str, name: &str) -> Arc<TargetState> {
        self.0.registry.state(identity, name)
    }

    /// The queue of the route `name`, the same through reloads.
    pub fn waitlist(&self, name: &str) -> Arc<Waitlist> {
        self.0.registry.waitlist(name)
    }

    /// The Redis link pools share their targets' caps and ejections on, when there is one.
    pub fn shared(&self) -> Option<Arc<SharedPools>> {
        self.0.shared.clone()
    }

    /// Puts `named` in place of the configured routes: new requests use it at once.
    pub fn replace(&self, named: HashMap<String, Arc<Route>>) {
        *self.0.named.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(named);
        *self.0.probes.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    fn named(&self) -> Arc<HashMap<String, Arc<Route>>> {
        self.0
            .named
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Every pool of a configured route, by route name, with its place in the route (0: the
    /// route's own, then its fallbacks').
    pub fn pools(&self) -> Vec<(String, usize, Arc<Pool>)> {
        let named = self.named();
        let mut names: Vec<&String> = named.keys().collect();
        names.sort();
        names
            .into_iter()
            .flat_map(|name| {
                let pools = named[name].pools.iter().enumerate();
                pools.map(move |(i, p)| (name.clone(), i, p.clone()))
            })
            .collect()
    }

    /// Each pool's state, for `/readyz`, and its series in the metrics. Without `timing`
    /// (an open `/readyz`) it leaves out when an ejected target is back and its recent time
    /// to first token: what would let a client time failures to keep a target out.
    pub fn report(&self, metrics: &crate::telemetry::Metrics, timing: bool) -> serde_json::Value {
        let now = Instant::now();
        let pools: Vec<serde_json::Value> = self
            .pools()
            .into_iter()
            .map(|(model, place, pool)| {
                let targets: Vec<serde_json::Value> = pool
                    .targets
                    .iter()
                    .map(|t| {
                        let state = &t.state;
                        let labels = [("model", model.as_str()), ("target", &*state.name)];
                        let condition = state.condition(now);
                        let ttft = state.ttft();
                        metrics
                            .gauge_with("sluice_pool_target_open_streams", &labels)
                            .set(f64::from(state.open()));
                        metrics
                            .gauge_with("sluice_pool_target_healthy", &labels)
                            .set(f64::from(u8::from(condition == target::Condition::Healthy)));
                        metrics
                            .gauge_with("sluice_pool_target_ttft_seconds", &labels)
                            .set(ttft.as_secs_f64());
                        metrics
                            .counter("sluice_pool_target_streams_total", &labels)
                            .absolute(state.started());
                        serde_json::json!({
                            "target": &*state.name,
                            "state": condition,
                            "open_streams": state.open(),
                            "max_streams": t.max_streams,
                            "weight": t.weight,
                            "streams": state.started(),
                            "ttft_ms": (timing && !ttft.is_zero()).then_some(ttft.as_millis() as u64),
                            "back_in_s": state.ejected_for(now).filter(|_| timing).map(|d| d.as_secs_f64().ceil() as u64),
                        })
                    })
                    .collect();
                if place == 0 {
                    metrics
                        .gauge_with("sluice_pool_queue_waiting", &[("model", model.as_str())])
                        .set(f64::from(pool.waiting()));
                }
                serde_json::json!({
                    "model": model,
                    "fallback": place,
                    "balance": pool.balance,
                    "waiting": pool.waiting(),
                    "queue": pool.queue_limit(),
                    "targets": targets,
                })
            })
            .collect();
        serde_json::Value::Array(pools)
    }

    /// The labels the pool series of the configured routes carry: each route's name, and
    /// each of its targets as `model NUL target`.
    pub fn live_pool_labels(&self) -> HashSet<String> {
        let mut live = HashSet::new();
        for (model, _, pool) in self.pools() {
            for target in &pool.targets {
                live.insert(format!("{model}\u{0}{}", target.state.name));
            }
            live.insert(model);
        }
        live
    }

    /// The state of every target that health applies to (a pool of several), each once.
    pub fn guarded_targets(&self) -> Vec<Arc<TargetState>> {
        let mut seen = HashSet::new();
        self.pools()
            .into_iter()
            .filter(|(_, _, pool)| pool.targets.len() > 1)
            .flat_map(|(_, _, pool)| {
                pool.targets
                    .iter()
                    .map(|t| t.state.clone())
                    .collect::<Vec<_>>()
            })
            .filter(|state| seen.insert(state.name.clone()))
            .collect()
    }

    /// Every upstream's readiness, probed at most once every few seconds however often
    /// it is asked for.
    pub async fn probe(&self) -> Arc<Vec<Probe>> {
        let shared = {
            let mut cached = self.0.probes.lock().unwrap_or_else(|e| e.into_inner());
            match &*cached {
                Some((at, probes)) if at.elapsed() < PROBES_SERVE => probes.clone(),
                _ => {
                    let mut seen = HashSet::new();
                    let probes: Vec<_> = self
                        .backends()
                        .into_iter()
                        .filter(|b| b.upstream().is_some_and(|url| seen.insert(url.to_owned())))
                        .filter_map(|b| b.probe())
                        .collect();
                    let all: futures::future::BoxFuture<'static, Arc<Vec<Probe>>> =
                        Box::pin(async move { Arc::new(futures::future::join_all(probes).await) });
                    let shared = futures::FutureExt::shared(all);
                    *cached = Some((Instant::now(), shared.clone()));
                    shared
                }
            }
        };
        shared.await
    }

    fn backends(&self) -> Vec<Arc<dyn Backend>> {
        let named = self.named();
        named
            .values()
            .chain(self.0.fixed.values())
            .flat_map(|r| r.pools.iter())
            .flat_map(|p| p.targets.iter().map(|t| t.backend.clone()))
            .chain(self.0.default_upstream.iter().cloned())
            .collect()
    }

    /// Fetches the default upstream's model list, and each pattern route's upstream's (the
    /// names it matches); a failure keeps the last good one.
    pub async fn refresh_catalogue(&self) {
        for (pattern, route) in self.named().iter().filter(|(name, _)| name.ends_with('*')) {
            let prefix = pattern.trim_end_matches('*');
            let Some(fetch) = route.first().and_then(|t| t.backend.models()) else {
                continue;
            };
            if let Ok(names) = fetch.await {
                let matching = names
                    .into_iter()
                    .filter(|n| n.starts_with(prefix) && n != prefix);
                let mut known = self
                    .0
                    .pattern_names
                    .write()
                    .unwrap_or_else(|e| e.into_inner());
                let names = known.entry(pattern.clone()).or_default();
                for name in matching {
                    if names.len() < SERVED_NAMES {
                        names.insert(name);
                    }
                }
            }
        }
        let Some(fetch) = self.0.default_upstream.as_ref().and_then(|b| b.models()) else {
            return;
        };
        match fetch.await {
            Ok(names) => {
                let names: HashSet<String> = names.into_iter().collect();
                tracing::debug!(models = names.len(), "the default upstream's model list");
                *self.0.catalogue.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(names);
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot list the default upstream's models; keeping the last list")
            }
        }
    }

    /// The default upstream's models, as last fetched.
    pub fn catalogue(&self) -> Arc<HashSet<String>> {
        self.0
            .catalogue
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Keeps the catalogue fresh and, with Redis, the pools' shared state, until `stop`.
    pub async fn maintain(self, stop: tokio_util::sync::CancellationToken) {
        let shared = self.0.shared.clone().map(|shared| {
            let routes = self.clone();
            shared.maintain(move || routes.guarded_targets(), stop.clone())
        });
        let catalogue = async {
            let mut every = tokio::time::interval(CATALOGUE_EVERY);
            every.tick().await;
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    _ = every.tick() => self.refresh_catalogue().await,
                }
            }
        };
        match shared {
            Some(shared) => {
                tokio::join!(shared, catalogue);
            }
            None => catalogue.await,
        }
    }

    pub fn resolve(&self, model: &str) -> Option<Arc<Route>> {
        let named = self.named();
        // A pattern (`claude-*`) names the models it serves, not a model of its own.
        if model.ends_with('*') {
            return None;
        }
        if let Some(route) = named.get(model).or_else(|| self.0.fixed.get(model)) {
            return Some(route.clone());
        }
        if mock::Mode::from_model(model).is_some() {
            return Some(self.0.mock.clone());
        }
        if let Some((_, route)) = pattern(&named, model) {
            return Some(route.clone());
        }
        self.0.default_route.clone()
    }

    /// The pattern route `model` would go to (its name), when it would go to one.
    pub fn pattern_of(&self, model: &str) -> Option<String> {
        let named = self.named();
        if model.ends_with('*') || named.contains_key(model) || self.0.fixed.contains_key(model) {
            return None;
        }
        pattern(&named, model)
            .filter(|(_, route)| route.off().is_none())
            .map(|(name, _)| name.clone())
    }

    /// `model` was served through the pattern route `pattern`: a name it is known to serve.
    pub fn served(&self, pattern: &str, model: &str) {
        let known = self
            .0
            .pattern_names
            .read()
            .unwrap_or_else(|e| e.into_inner());
        if known.get(pattern).is_some_and(|n| n.contains(model)) {
            return;
        }
        drop(known);
        let mut known = self
            .0
            .pattern_names
            .write()
            .unwrap_or_else(|e| e.into_inner());
        let names = known.entry(pattern.to_owned()).or_default();
        if names.len() < SERVED_NAMES {
            names.insert(model.to_owned());
        }
    }

    /// Each configured pattern route with the names it is known to serve, sorted.
    pub fn patterns(&self) -> Vec<(String, Vec<String>)> {
        let known = self
            .0
            .pattern_names
            .read()
            .unwrap_or_else(|e| e.into_inner());
        let mut patterns: Vec<(String, Vec<String>)> = self
            .named()
            .iter()
            .filter(|(name, route)| name.ends_with('*') && route.off().is_none())
            .map(|(pattern, _)| {
                let mut names: Vec<String> = known
                    .get(pattern)
                    .map(|n| n.iter().cloned().collect())
                    .unwrap_or_default();
                names.sort();
                (pattern.clone(), names)
            })
            .collect();
        patterns.sort();
        patterns
    }

    /// Every name sluice routes by itself, the default first, then sorted (the default
    /// upstream takes any other name; a pattern route, see [`Routes::patterns`], any name
    /// it matches).
    pub fn model_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .named()
            .iter()
            .filter(|(name, route)| !name.ends_with('*') && route.off().is_none())
            .map(|(name, _)| name.clone())
            .collect();
        names.extend(self.0.fixed.keys().cloned());
        names.extend(mock::Mode::MODEL_NAMES.iter().map(|s| (*s).to_owned()));
        names.sort();
        names.dedup();
        names.sort_by_key(|name| **name != *self.0.default_model);
        names
    }

    /// The model of a request that names none: the local model when it is loaded.
    pub fn default_model(&self) -> &str {
        &self.0.default_model
    }

    pub fn has_default_upstream(&self) -> bool {
        self.0.default_upstream.is_some()
    }

    /// The name a model's metrics are labelled with: its own when sluice routes it by
    /// itself, else `other` (the default upstream takes any name; labels must stay few).
    pub fn label(&self, model: &str) -> String {
        let named = self.named();
        let known_name = named.contains_key(model) || self.0.fixed.contains_key(model);
        if !known_name && let Some((pattern, _)) = pattern(&named, model) {
            return pattern.clone();
        }
        let known = known_name
            || mock::Mode::from_model(model).is_some()
            || model == &*self.0.default_model
            || self.catalogue().contains(model);
        if known { model } else { "other" }.to_owned()
    }

    /// Every upstream base URL sluice may call (credentials masked), each once, sorted.
    pub fn upstreams(&self) -> Vec<String> {
        let mut urls: Vec<String> = self
            .backends()
            .iter()
            .filter_map(|b| b.upstream().map(str::to_owned))
            .collect();
        urls.sort();
        urls.dedup();
        urls
    }
}

/// The configured route whose name is a pattern (`claude-*`) that `model` matches: the
/// longest such prefix.
fn pattern<'a>(
    named: &'a HashMap<String, Arc<Route>>,
    model: &str,
) -> Option<(&'a String, &'a Arc<Route>)> {
    named
        .iter()
        .filter(|(name, _)| {
            name.strip_suffix('*')
                .is_some_and(|prefix| model.starts_with(prefix))
        })
        .max_by_key(|(name, _)| name.len())
}
