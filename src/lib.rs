//! lxbridge: carries 1C:Enterprise object changes between bases and sites through RabbitMQ
//! (or, on one machine, through its embedded backend).
//!
//! Data flow (see ARCHITECTURE.md): `ingress` parses and authenticates a POST, `route`
//! decides the targets, `broker` publishes with confirms to the source node's exchange
//! (`embedded` is the same broker and store on SQLite);
//! `deliver` consumes each target's queue and pushes batches; `store` keeps every object's
//! status and history; `admin` shows them; `metrics` counts everything; `app` wires it.

// Handlers return an axum `Response` as their error: boxing it would only add noise.
#![allow(clippy::result_large_err)]

pub mod admin;
pub mod app;
pub mod broker;
pub mod cli;
pub mod clock;
pub mod commerceml;
pub mod config;
pub mod copies;
pub mod deliver;
pub mod embedded;
pub mod group;
pub mod http;
pub mod ingress;
pub mod metrics;
pub mod migrate;
pub mod model;
pub mod route;
pub mod store;
pub mod template;
pub mod tls;
pub mod topic;
pub mod transform;

use std::collections::HashMap;
use std::sync::Arc;

/// What HTTP handlers share.
pub struct AppState {
    pub config: Arc<config::Config>,
    pub routes: Arc<route::Routes>,
    pub broker: Arc<dyn broker::Broker>,
    pub store: Arc<dyn store::Store>,
    pub metrics: Arc<metrics::Metrics>,
    pub node_metrics: HashMap<String, metrics::NodeMetrics>,
    /// Serialises DLQ list/replay/purge in this process (they hold DLQ messages unacked).
    pub dlq_lock: tokio::sync::Mutex<()>,
    /// The inbox of each pull target.
    pub inboxes: HashMap<String, Arc<deliver::pull::Inbox>>,
    /// The CommerceML imports this process runs.
    pub commerceml: ingress::commerceml::Imports,
    /// The webhook nodes' entries, compiled.
    pub webhooks: ingress::webhook::Webhooks,
    /// Cancelled on shutdown: long polls end early.
    pub shutdown: tokio_util::sync::CancellationToken,
}
