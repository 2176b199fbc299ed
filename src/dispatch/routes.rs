//! The model table: which backends a model name goes to, in order, with the default
//! upstream's own model list (for `/v1/models` and bounded metric labels) and the shared
//! readiness probes of every upstream.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use crate::backend::mock;
use crate::backend::{Backend, Probe};

/// A backend and the name it knows the model by.
#[derive(Clone)]
pub struct Target {
    pub backend: Arc<dyn Backend>,
    pub model: String,
    /// From the configuration: its model name is a fit metric label. Otherwise the name is
    /// the client's, and the route's label stands for it.
    pub configured: bool,
}

/// Where a model name goes: a first target, then its fallbacks, tried in order while
/// nothing has been sent to the client.
#[derive(Clone)]
pub struct Route {
    pub targets: Arc<[Target]>,
}

impl Route {
    pub fn to(backend: Arc<dyn Backend>, model: &str) -> Self {
        Route {
            targets: Arc::new([Target {
                backend,
                model: model.to_owned(),
                configured: false,
            }]),
        }
    }
}

/// How often the default upstream's model list is fetched again.
const CATALOGUE_EVERY: Duration = Duration::from_secs(300);

/// The routing table: configured names first, then the built-in mock models, then anything
/// else to the default upstream when one is configured.
#[derive(Clone)]
pub struct Routes {
    named: Arc<HashMap<String, Route>>,
    mock: Arc<dyn Backend>,
    default_upstream: Option<Arc<dyn Backend>>,
    default_model: Arc<str>,
    /// The default upstream's own model list, as last fetched.
    catalogue: Arc<RwLock<Arc<HashSet<String>>>>,
    /// The last readiness probe of every upstream: one probe at a time, shared by every
    /// caller, reused for a few seconds.
    probes: Arc<Mutex<Option<(Instant, SharedProbes)>>>,
}

type SharedProbes = futures::future::Shared<futures::future::BoxFuture<'static, Arc<Vec<Probe>>>>;

/// How long one readiness probe of the upstreams serves.
const PROBES_SERVE: Duration = Duration::from_secs(5);

impl Routes {
    pub fn new(
        named: HashMap<String, Route>,
        mock: Arc<dyn Backend>,
        default_upstream: Option<Arc<dyn Backend>>,
        default_model: String,
    ) -> Self {
        Routes {
            named: Arc::new(named),
            mock,
            default_upstream,
            default_model: default_model.into(),
            catalogue: Arc::default(),
            probes: Arc::default(),
        }
    }

    /// Every upstream's readiness, probed at most once every few seconds however often
    /// it is asked for.
    pub async fn probe(&self) -> Arc<Vec<Probe>> {
        let shared = {
            let mut cached = self.probes.lock().unwrap_or_else(|e| e.into_inner());
            match &*cached {
                Some((at, probes)) if at.elapsed() < PROBES_SERVE => probes.clone(),
                _ => {
                    let mut seen = HashSet::new();
                    let probes: Vec<_> = self
                        .backends()
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

    fn backends(&self) -> impl Iterator<Item = &Arc<dyn Backend>> {
        self.named
            .values()
            .flat_map(|r| r.targets.iter().map(|t| &t.backend))
            .chain(self.default_upstream.iter())
    }

    /// Fetches the default upstream's model list; a failure keeps the last good one.
    pub async fn refresh_catalogue(&self) {
        let Some(fetch) = self.default_upstream.as_ref().and_then(|b| b.models()) else {
            return;
        };
        match fetch.await {
            Ok(names) => {
                let names: HashSet<String> = names.into_iter().collect();
                tracing::debug!(models = names.len(), "the default upstream's model list");
                *self.catalogue.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(names);
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot list the default upstream's models; keeping the last list")
            }
        }
    }

    /// The default upstream's models, as last fetched.
    pub fn catalogue(&self) -> Arc<HashSet<String>> {
        self.catalogue
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Keeps the catalogue fresh until `stop`.
    pub async fn maintain(self, stop: tokio_util::sync::CancellationToken) {
        let mut every = tokio::time::interval(CATALOGUE_EVERY);
        every.tick().await;
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = every.tick() => self.refresh_catalogue().await,
            }
        }
    }

    pub fn resolve(&self, model: &str) -> Option<Route> {
        if let Some(route) = self.named.get(model) {
            return Some(route.clone());
        }
        if mock::Mode::from_model(model).is_some() {
            return Some(Route::to(self.mock.clone(), model));
        }
        if let Some((pattern, route)) = self.pattern(model) {
            // A target that names no model of its own gets the client's name.
            let targets = route
                .targets
                .iter()
                .map(|t| {
                    if t.model != *pattern {
                        return t.clone();
                    }
                    // The client's name is no fit metric label: the pattern stands for it.
                    Target {
                        model: model.to_owned(),
                        configured: false,
                        ..t.clone()
                    }
                })
                .collect();
            return Some(Route { targets });
        }
        self.default_upstream
            .as_ref()
            .map(|backend| Route::to(backend.clone(), model))
    }

    /// The configured route whose name is a pattern (`claude-*`) that `model` matches: the
    /// longest such prefix.
    fn pattern(&self, model: &str) -> Option<(&String, &Route)> {
        self.named
            .iter()
            .filter(|(name, _)| {
                name.strip_suffix('*')
                    .is_some_and(|prefix| model.starts_with(prefix))
            })
            .max_by_key(|(name, _)| name.len())
    }

    /// Every name sluice routes by itself, the default first, then sorted (the default
    /// upstream takes any other name).
    pub fn model_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.named.keys().cloned().collect();
        names.extend(mock::Mode::MODEL_NAMES.iter().map(|s| (*s).to_owned()));
        names.sort();
        names.dedup();
        names.sort_by_key(|name| **name != *self.default_model);
        names
    }

    /// The model of a request that names none: the local model when it is loaded.
    pub fn default_model(&self) -> &str {
        &self.default_model
    }

    pub fn has_default_upstream(&self) -> bool {
        self.default_upstream.is_some()
    }

    /// The name a model's metrics are labelled with: its own when sluice routes it by
    /// itself, else `other` (the default upstream takes any name; labels must stay few).
    pub fn label(&self, model: &str) -> String {
        if !self.named.contains_key(model)
            && let Some((pattern, _)) = self.pattern(model)
        {
            return pattern.clone();
        }
        let known = self.named.contains_key(model)
            || mock::Mode::from_model(model).is_some()
            || model == &*self.default_model
            || self.catalogue().contains(model);
        if known { model } else { "other" }.to_owned()
    }

    /// Every upstream base URL sluice may call (credentials masked), each once, sorted.
    pub fn upstreams(&self) -> Vec<String> {
        let mut urls: Vec<String> = self
            .backends()
            .filter_map(|b| b.upstream().map(str::to_owned))
            .collect();
        urls.sort();
        urls.dedup();
        urls
    }
}
