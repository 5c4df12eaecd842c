//! Wiring: builds the broker, store, delivery and HTTP server from a config, in order, and
//! shuts them down in the reverse order on SIGTERM/SIGINT. No business logic lives here.
//!
//! Shutdown order (each step waits for the previous one):
//! 1. stop accepting HTTP connections and let in-flight requests finish (they may still
//!    publish), and stop consuming: each delivery lane finishes and settles its batch;
//! 2. close the broker connections (unacked prefetched messages go back to their queues).

use crate::broker::{Broker, RabbitBroker};
use crate::config::{Backend, Config, DeliverConfig, DeliverMode};
use crate::deliver::pull::Inbox;
use crate::deliver::{announce, Core, PushTarget, Shaping};
use crate::embedded::{Db, EmbeddedBroker, EmbeddedStore};
use crate::metrics::Metrics;
use crate::route::Routes;
use crate::store::{RedisStore, Store};
use crate::{admin, ingress, AppState};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("the config has problems:\n  {}", .0.join("\n  "))]
    Invalid(Vec<String>),
    #[error("cannot listen on {addr}: {error}")]
    Listen { addr: String, error: std::io::Error },
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Deliver(#[from] crate::deliver::DeliverError),
    #[error(transparent)]
    Embedded(#[from] crate::embedded::DbError),
    #[error(transparent)]
    Broker(#[from] crate::broker::BrokerError),
}

/// A started lxbridge: where it listens and how to stop it.
pub struct Running {
    pub addr: SocketAddr,
    pub state: Arc<AppState>,
    shutdown: CancellationToken,
    done: tokio::task::JoinHandle<()>,
}

impl Running {
    /// Graceful shutdown, as on SIGTERM; returns when everything has stopped.
    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = self.done.await;
    }

    /// Waits until shutdown was asked for (by [`Running::stop`] or a signal) and completed.
    pub async fn wait(self) {
        let _ = self.done.await;
    }

    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }
}

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/api/v1/nodes/{node}/changes", post(ingress::post_changes))
        .route("/api/v1/nodes/{node}/inbox", get(ingress::get_inbox))
        .route("/api/v1/nodes/{node}/webhook", post(ingress::post_webhook))
        .route(
            "/api/v1/nodes/{node}/commerceml",
            get(ingress::commerceml::commerceml).post(ingress::commerceml::commerceml),
        )
        .route(
            "/api/v1/nodes/{node}/commerceml/hashes",
            delete(admin::forget_commerceml_hashes),
        )
        .route(
            "/api/v1/nodes/{node}/inbox/ack",
            post(ingress::post_inbox_ack),
        )
        .route("/api/v1/objects/{*reference}", get(admin::get_object))
        .route(
            "/api/v1/dlq/{target}",
            get(admin::list_dlq).delete(admin::purge_dlq),
        )
        .route("/api/v1/dlq/{target}/replay", post(admin::replay_dlq))
        .route("/api/v1/groups/{group}/resync", post(admin::resync_group))
        .route(
            "/api/v1/remap/{target}",
            get(admin::get_remap).put(admin::put_remap),
        )
        .route(
            "/healthz",
            get(|| async { Json(serde_json::json!({"status": "ok"})) }),
        )
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .fallback(|| async {
            crate::http::error_response(StatusCode::NOT_FOUND, "no such endpoint")
        })
        .method_not_allowed_fallback(|| async {
            crate::http::error_response(
                StatusCode::METHOD_NOT_ALLOWED,
                "this endpoint does not take that method",
            )
        })
        .layer(axum::middleware::map_response(json_errors))
        .with_state(state)
}

/// Every 4xx/5xx answer has a JSON `{"error"}` body (docs/api.md): axum's own rejections (a path
/// segment that is not UTF-8, a malformed query) come as plain text and are wrapped here.
async fn json_errors(response: Response) -> Response {
    let status = response.status();
    let is_json = response
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    // CommerceML answers are the protocol's text (`failure` first), which 1C reads.
    let commerceml = response
        .extensions()
        .get::<crate::ingress::commerceml::Status>()
        .is_some();
    if !(status.is_client_error() || status.is_server_error()) || is_json || commerceml {
        return response;
    }
    let text = axum::body::to_bytes(response.into_body(), 64 * 1024)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .unwrap_or_default();
    let text = if text.is_empty() {
        status.canonical_reason().unwrap_or("error").to_string()
    } else {
        text
    };
    crate::http::error_response(status, text)
}

async fn readyz(State(app): State<Arc<AppState>>) -> Response {
    let broker = app.broker.ready() && app.broker.inboxes_reachable();
    let ping = match tokio::time::timeout(Duration::from_secs(2), app.store.ping()).await {
        Ok(answer) => answer.map_err(|e| e.to_string()),
        Err(_) => Err("no answer within 2 s".to_string()),
    };
    let store = ping.is_ok();
    app.metrics.store_up.set(i64::from(store));
    let status = if broker && store {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let mut body = serde_json::json!({"broker": broker, "store": store});
    let endpoints = app.broker.endpoints();
    if endpoints.publish.is_some() || endpoints.consume.is_some() || endpoints.error.is_some() {
        body["broker_endpoints"] = serde_json::json!(endpoints);
    }
    if let Some(endpoint) = app.store.endpoint() {
        body["store_endpoint"] = endpoint.into();
    }
    if let Err(why) = ping {
        body["store_error"] = why.into();
    }
    (status, Json(body)).into_response()
}

async fn metrics(State(app): State<Arc<AppState>>) -> Response {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        app.metrics.render(),
    )
        .into_response()
}

/// Connects once to each RabbitMQ node and to the store of a valid `config` (nothing for
/// the embedded backend): what can't be reached, one line each, naming it and why.
pub async fn probe(config: &Config) -> Vec<String> {
    if config.backend != Backend::Rabbit {
        return Vec::new();
    }
    let tls = match crate::tls::Material::of(
        config.broker.tls.as_ref(),
        &config.base_dir,
        "broker.tls",
    ) {
        Ok(tls) => tls,
        Err(problems) => return problems,
    };
    let mut problems = crate::broker::probe(&config.broker.url.0, &tls).await;
    problems.extend(RedisStore::probe(config).await);
    problems
}

/// Starts lxbridge on `listener` (use port 0 in tests). Returns once the server accepts
/// connections; the broker connects in the background.
pub async fn start(config: Config, listener: TcpListener) -> Result<Running, AppError> {
    let problems = config.validate();
    if !problems.is_empty() {
        return Err(AppError::Invalid(problems));
    }
    let addr = listener.local_addr().map_err(|error| AppError::Listen {
        addr: config.server.listen.clone(),
        error,
    })?;
    let config = Arc::new(config);
    let routes = Arc::new(Routes::from_config(&config));
    let metrics = Arc::new(Metrics::new());
    let tasks = Tasks::new();
    let backend = open_backend(&config, &routes, &metrics, &tasks)?;
    let inboxes = start_deliveries(&config, &routes, &backend, &metrics, &tasks)?;
    let node_metrics = config
        .nodes
        .iter()
        .map(|n| (n.name.clone(), metrics.node(&n.name)))
        .collect();
    let state = Arc::new(AppState {
        config: config.clone(),
        routes,
        broker: backend.broker,
        store: backend.store,
        metrics,
        node_metrics,
        dlq_lock: tokio::sync::Mutex::new(()),
        inboxes,
        commerceml: Default::default(),
        webhooks: ingress::webhook::Webhooks::from_config(&config),
        shutdown: tasks.shutdown.clone(),
    });
    spawn_queue_depths(&state, tasks.shutdown.clone(), &tasks.broker);
    crate::deliver::site::orders::start(&state, tasks.shutdown.clone(), &tasks.deliveries);
    let shutdown = tasks.shutdown.clone();
    let done = tokio::spawn(serve(listener, state.clone(), tasks, backend.db));
    log_listening(&config, addr);
    Ok(Running {
        addr,
        state,
        shutdown,
        done,
    })
}

/// What a started lxbridge stops, in this order (see the module doc).
struct Tasks {
    /// Stops the HTTP server, the deliveries and the poller.
    shutdown: CancellationToken,
    /// The delivery dispatchers, lanes and inboxes.
    deliveries: TaskTracker,
    /// Stops the broker supervisors (and the embedded expiry), once deliveries ended.
    broker_stop: CancellationToken,
    /// The broker supervisors, the poller and the embedded expiry.
    broker: TaskTracker,
}

impl Tasks {
    fn new() -> Tasks {
        Tasks {
            shutdown: CancellationToken::new(),
            deliveries: TaskTracker::new(),
            broker_stop: CancellationToken::new(),
            broker: TaskTracker::new(),
        }
    }
}

/// What carries the changes: the broker and the store, and the embedded database to close
/// last (none for RabbitMQ + Redis).
struct BackendHandles {
    broker: Arc<dyn Broker>,
    store: Arc<dyn Store>,
    db: Option<Arc<Db>>,
}

/// Connects to RabbitMQ and Redis (in the background), or opens the embedded database.
fn open_backend(
    config: &Arc<Config>,
    routes: &Arc<Routes>,
    metrics: &Metrics,
    tasks: &Tasks,
) -> Result<BackendHandles, AppError> {
    match config.backend {
        Backend::Rabbit => Ok(BackendHandles {
            store: Arc::new(RedisStore::new(config, metrics.store_endpoint.clone())?),
            broker: RabbitBroker::start(
                config,
                routes,
                tasks.broker_stop.clone(),
                &tasks.broker,
                metrics,
            )?,
            db: None,
        }),
        Backend::Embedded => open_embedded(config, routes, metrics, tasks),
    }
}

/// The embedded database, its store (with the expiry task) and its broker.
fn open_embedded(
    config: &Arc<Config>,
    routes: &Arc<Routes>,
    metrics: &Metrics,
    tasks: &Tasks,
) -> Result<BackendHandles, AppError> {
    let db = Db::open(&config.data_dir())?;
    let store = Arc::new(EmbeddedStore::new(
        db.clone(),
        config.server.dedupe_window.0,
        config.store.retention.0,
        config.store.history_max,
    ));
    spawn_expiry(store.clone(), tasks.broker_stop.clone(), &tasks.broker);
    let broker = EmbeddedBroker::start(
        db.clone(),
        config,
        routes.clone(),
        tasks.broker_stop.clone(),
        &tasks.broker,
    );
    metrics.broker_up.set(1);
    Ok(BackendHandles {
        broker,
        store,
        db: Some(db),
    })
}

/// Starts every target's delivery: an inbox per pull target, a dispatcher per push target.
/// Returns the inboxes, which the ingress asks.
fn start_deliveries(
    config: &Config,
    routes: &Routes,
    backend: &BackendHandles,
    metrics: &Metrics,
    tasks: &Tasks,
) -> Result<HashMap<String, Arc<Inbox>>, AppError> {
    let core = |name: &str, deliver: &DeliverConfig| -> Result<Core, AppError> {
        Ok(Core {
            name: name.to_string(),
            broker: backend.broker.clone(),
            store: backend.store.clone(),
            metrics: metrics.target(name),
            shaping: shaping(config, name, deliver)?,
            group: routes.group_of(name).cloned(),
            seen: Default::default(),
        })
    };
    let mut inboxes = HashMap::new();
    for node in &config.nodes {
        let Some(deliver) = node
            .deliver
            .as_ref()
            .filter(|d| d.mode == DeliverMode::Pull)
        else {
            continue;
        };
        let inbox = Inbox::new(
            core(&node.name, deliver)?,
            deliver.batch_max,
            deliver.lease.0,
        );
        inbox.start(tasks.shutdown.clone(), &tasks.deliveries);
        inboxes.insert(node.name.clone(), inbox);
    }
    for (node, deliver) in config.push_targets() {
        let target = PushTarget::new(deliver, core(&node.name, deliver)?, metrics)?;
        announce(&target);
        target.start(tasks.shutdown.clone(), &tasks.deliveries);
    }
    tasks.deliveries.close();
    Ok(inboxes)
}

/// Serves HTTP until shutdown, then stops the rest in order: the deliveries (at most
/// `server.shutdown_grace`), the broker supervisors (at most 5 s), the embedded database.
async fn serve(listener: TcpListener, state: Arc<AppState>, tasks: Tasks, db: Option<Arc<Db>>) {
    let grace = state.config.server.shutdown_grace.0;
    let shutdown = tasks.shutdown.clone();
    let server = axum::serve(listener, router(state))
        .with_graceful_shutdown(async move { shutdown.cancelled().await });
    if let Err(e) = server.await {
        warn!(error = %e, "HTTP server failed");
    }
    info!("HTTP server stopped; finishing deliveries");
    if tokio::time::timeout(grace, tasks.deliveries.wait())
        .await
        .is_err()
    {
        warn!(grace_secs = grace.as_secs(), "deliveries did not finish within the grace period; unacked changes return to their queues");
    }
    // The broker's supervisors close their connections (unacked messages go back).
    tasks.broker_stop.cancel();
    tasks.broker.close();
    let _ = tokio::time::timeout(Duration::from_secs(5), tasks.broker.wait()).await;
    if let Some(db) = db {
        db.close().await;
    }
    info!("lxbridge stopped");
}

fn log_listening(config: &Config, addr: SocketAddr) {
    match config.backend {
        Backend::Rabbit => info!(%addr, backend = "rabbitmq+redis", "lxbridge listening"),
        Backend::Embedded => info!(
            %addr,
            backend = "embedded",
            data_dir = %config.data_dir().display(),
            "lxbridge listening"
        ),
    }
}

/// How a target's changes are reshaped: the mappings of the routes into it, its format and
/// its reference handling.
fn shaping(config: &Config, target: &str, deliver: &DeliverConfig) -> Result<Shaping, AppError> {
    Shaping::from_config(config, target, deliver).map_err(AppError::Invalid)
}

/// Every second: steps the store's loss marker (`lx_store_up`; a loss is logged once and
/// counted in `lx_store_losses_total`); every five seconds: reads the DLQ and retry queue
/// depths into `lx_dlq_messages` and `lx_retry_messages`.
fn spawn_queue_depths(state: &Arc<AppState>, stop: CancellationToken, tracker: &TaskTracker) {
    let state = state.clone();
    tracker.spawn(async move {
        let targets: Vec<String> = state
            .config
            .nodes
            .iter()
            .filter(|n| n.deliver.is_some())
            .map(|n| n.name.clone())
            .collect();
        // The store every second (one INCR: it also tells a store that forgot), the queue
        // depths every fifth.
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut ticks: u64 = 0;
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tick.tick() => {}
            }
            check_store(&state).await;
            ticks += 1;
            if ticks % 5 == 1 {
                read_queue_depths(&state, &targets).await;
            }
        }
    });
}

/// Steps the store's loss marker into `lx_store_up`; a loss is logged and counted.
async fn check_store(state: &AppState) {
    let check = tokio::time::timeout(Duration::from_secs(2), state.store.check_loss())
        .await
        .unwrap_or_else(|_| {
            Err(crate::store::StoreError::Unavailable(
                "no answer within 2s".into(),
            ))
        });
    state.metrics.store_up.set(i64::from(check.is_ok()));
    if let Ok(true) = check {
        state.metrics.store_losses.inc();
        tracing::error!(
            store = "redis",
            lost = "idempotency keys, delivery marks, statuses, history and group states written before",
            kept = "sequence and inbox numbers continue above the clock floor; delivery marks this instance raised are kept in its memory",
            risk = "a change a client repeats may be delivered twice; an object another instance served may get an older change",
            "the store lost data (Redis restarted empty or an older replica took over); carrying on"
        );
    }
}

/// Each target's DLQ and retry queue depths into `lx_dlq_messages` and `lx_retry_messages`.
async fn read_queue_depths(state: &AppState, targets: &[String]) {
    for target in targets {
        if let Ok((dlq, retry)) = state.broker.queue_depths(target).await {
            state
                .metrics
                .dlq_messages
                .with_label_values(&[target])
                .set(i64::from(dlq));
            state
                .metrics
                .retry_messages
                .with_label_values(&[target])
                .set(i64::from(retry));
        }
    }
}

/// Every minute: deletes the embedded store's expired rows (Redis expires keys itself).
fn spawn_expiry(store: Arc<EmbeddedStore>, stop: CancellationToken, tracker: &TaskTracker) {
    tracker.spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(60));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tick.tick() => {}
            }
            if let Err(e) = store.expire().await {
                warn!(error = %e, "embedded store: deleting expired rows failed");
            }
        }
    });
}

/// Runs until SIGTERM or SIGINT, then shuts down gracefully.
pub async fn run(config: Config) -> Result<(), AppError> {
    let listen = config.server.listen.clone();
    let listener = TcpListener::bind(&listen)
        .await
        .map_err(|error| AppError::Listen {
            addr: listen,
            error,
        })?;
    let running = start(config, listener).await?;
    let token = running.shutdown_token();
    tokio::spawn(async move {
        wait_for_signal().await;
        info!("signal received; shutting down");
        token.cancel();
    });
    running.wait().await;
    Ok(())
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = match signal(SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
                return;
            }
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
