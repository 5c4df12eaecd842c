//! Every Prometheus metric lxbridge exports, defined in one place (names per docs/api.md).
//!
//! Hot paths hold pre-resolved label handles ([`TargetMetrics`], [`NodeMetrics`]) so that
//! counting a change allocates nothing.

use prometheus::{
    exponential_buckets, Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter,
    IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

pub struct Metrics {
    registry: Registry,
    pub ingress_requests: IntCounterVec,
    pub commerceml: CommerceMlMetrics,
    pub integrations: IntegrationMetrics,
    pub changes_accepted: IntCounterVec,
    pub changes_rejected: IntCounterVec,
    pub deliveries: IntCounterVec,
    pub delivery_duration: HistogramVec,
    pub end_to_end: HistogramVec,
    pub dlq_messages: IntGaugeVec,
    pub retry_messages: IntGaugeVec,
    pub inflight: IntGaugeVec,
    pub broker_up: IntGauge,
    /// 1 for the RabbitMQ node each connection is on (`connection`, `endpoint`).
    pub broker_endpoint: IntGaugeVec,
    /// 1 for the Redis server the store is on (`endpoint`, `via`: direct or sentinel).
    pub store_endpoint: IntGaugeVec,
    pub store_up: IntGauge,
    /// Times this process found that the store forgot its data (Redis restarted empty, or
    /// an older replica took over).
    pub store_losses: IntCounter,
    pub breaker_open: IntGaugeVec,
    pub group_changes: IntCounterVec,
}

/// Label handles for one target node.
#[derive(Clone)]
pub struct TargetMetrics {
    pub ok: IntCounter,
    pub retry: IntCounter,
    pub dead: IntCounter,
    pub superseded: IntCounter,
    pub filtered: IntCounter,
    pub duration: Histogram,
    pub end_to_end: Histogram,
    pub inflight: IntGauge,
    pub breaker_open: IntGauge,
}

/// Label handles for one source node's ingress.
#[derive(Clone)]
pub struct NodeMetrics {
    pub accepted: IntCounter,
    pub rejected: IntCounter,
}

fn counter_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("metric definition");
    registry
        .register(Box::new(c.clone()))
        .expect("metric registers once");
    c
}

fn gauge_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("metric definition");
    registry
        .register(Box::new(g.clone()))
        .expect("metric registers once");
    g
}

fn histogram_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> HistogramVec {
    // 0.5 ms .. ~65 s
    let buckets = exponential_buckets(0.0005, 2.0, 18).expect("bucket definition");
    let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)
        .expect("metric definition");
    registry
        .register(Box::new(h.clone()))
        .expect("metric registers once");
    h
}

fn counter(registry: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).expect("metric definition");
    registry
        .register(Box::new(c.clone()))
        .expect("metric registers once");
    c
}

fn gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).expect("metric definition");
    registry
        .register(Box::new(g.clone()))
        .expect("metric registers once");
    g
}

/// The CommerceML exchanges' metrics: lxbridge as a site (requests, elements) and as 1C
/// (order rounds, orders).
pub struct CommerceMlMetrics {
    pub requests: IntCounterVec,
    pub elements: IntCounterVec,
    pub order_rounds: IntCounterVec,
    pub orders: IntCounterVec,
}

impl CommerceMlMetrics {
    fn new(r: &Registry) -> CommerceMlMetrics {
        CommerceMlMetrics {
        requests: counter_vec(
            r,
            "lx_commerceml_requests_total",
            "CommerceML exchange requests by node, mode and the answer's first line",
            &["node", "mode", "status"],
        ),
        elements: counter_vec(
            r,
            "lx_commerceml_elements_total",
            "Elements of imported CommerceML files by node and outcome (accepted, unchanged, duplicate, unroutable, rejected)",
            &["node", "outcome"],
        ),
        order_rounds: counter_vec(
            r,
            "lx_commerceml_order_rounds_total",
            "Rounds of fetching a CommerceML site's orders by node and result (ok, failed)",
            &["node", "result"],
        ),
        orders: counter_vec(
            r,
            "lx_commerceml_orders_total",
            "Orders fetched from CommerceML sites by node and outcome (accepted, unchanged, rejected)",
            &["node", "outcome"],
        ),
        }
    }
}

/// Webhooks in and REST calls out (docs/integrations.md "Metrics").
pub struct IntegrationMetrics {
    pub webhook_requests: IntCounterVec,
    pub http_requests: IntCounterVec,
    pub rate_waits: IntCounterVec,
}

/// Label handles for one REST target.
#[derive(Clone)]
pub struct RestMetrics {
    pub ok: IntCounter,
    pub refused: IntCounter,
    pub throttled: IntCounter,
    pub unreachable: IntCounter,
    pub rate_waits: IntCounter,
}

impl IntegrationMetrics {
    fn new(r: &Registry) -> IntegrationMetrics {
        IntegrationMetrics {
            webhook_requests: counter_vec(
                r,
                "lx_webhook_requests_total",
                "Webhook requests by node and the HTTP status answered",
                &["node", "status"],
            ),
            http_requests: counter_vec(
                r,
                "lx_http_requests_total",
                "Requests to REST targets by outcome (ok, refused, throttled, unreachable)",
                &["target", "outcome"],
            ),
            rate_waits: counter_vec(
                r,
                "lx_rate_waits_total",
                "Requests to a REST target that waited for a rate slot",
                &["target"],
            ),
        }
    }

    pub fn rest(&self, target: &str) -> RestMetrics {
        let outcome = |o: &str| self.http_requests.with_label_values(&[target, o]);
        RestMetrics {
            ok: outcome("ok"),
            refused: outcome("refused"),
            throttled: outcome("throttled"),
            unreachable: outcome("unreachable"),
            rate_waits: self.rate_waits.with_label_values(&[target]),
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let r = Registry::new();
        // process_resident_memory_bytes, process_cpu_seconds_total, process_open_fds, ...
        #[cfg(target_os = "linux")]
        r.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))
        .expect("process collector registers once");
        Metrics {
            ingress_requests: counter_vec(
                &r,
                "lx_ingress_requests_total",
                "Ingress HTTP requests by source node and status code",
                &["node", "code"],
            ),
            commerceml: CommerceMlMetrics::new(&r),
            integrations: IntegrationMetrics::new(&r),
            changes_accepted: counter_vec(
                &r,
                "lx_changes_accepted_total",
                "Changes accepted (broker-confirmed) per source node",
                &["node"],
            ),
            changes_rejected: counter_vec(
                &r,
                "lx_changes_rejected_total",
                "Changes rejected at ingress per source node",
                &["node"],
            ),
            group_changes: counter_vec(
                &r,
                "lx_group_changes_total",
                "Changes of group members at ingress by result (published, conflict_won, conflict_lost, echo, loop, superseded)",
                &["group", "result"],
            ),
            deliveries: counter_vec(
                &r,
                "lx_deliveries_total",
                "Change deliveries per target by result (ok, retry, dead, superseded, filtered)",
                &["target", "result"],
            ),
            delivery_duration: histogram_vec(
                &r,
                "lx_delivery_duration_seconds",
                "Duration of one delivery batch to a target",
                &["target"],
            ),
            end_to_end: histogram_vec(
                &r,
                "lx_end_to_end_seconds",
                "Per change, from accepted at ingress to delivered at the target",
                &["target"],
            ),
            dlq_messages: gauge_vec(
                &r,
                "lx_dlq_messages",
                "Changes in a target's dead-letter queue",
                &["target"],
            ),
            retry_messages: gauge_vec(
                &r,
                "lx_retry_messages",
                "Changes waiting in a target's retry queues",
                &["target"],
            ),
            inflight: gauge_vec(
                &r,
                "lx_inflight",
                "Changes handed to a target and not yet answered",
                &["target"],
            ),
            broker_up: gauge(
                &r,
                "lx_broker_up",
                "1 while the publishing connection to RabbitMQ is up",
            ),
            broker_endpoint: gauge_vec(
                &r,
                "lx_broker_endpoint",
                "1 for the RabbitMQ node (host:port) each connection (publish, consume) is on",
                &["connection", "endpoint"],
            ),
            store_up: gauge(&r, "lx_store_up", "1 while the store (Redis) answers"),
            store_endpoint: gauge_vec(
                &r,
                "lx_store_endpoint",
                "1 for the Redis server (host:port) the store is on, and how it was found (direct, sentinel)",
                &["endpoint", "via"],
            ),
            store_losses: counter(
                &r,
                "lx_store_losses_total",
                "Times the store (Redis) was found to have lost its data (restarted empty, or an older replica took over)",
            ),
            breaker_open: gauge_vec(
                &r,
                "lx_breaker_open",
                "1 while a target's circuit breaker is open (deliveries paused)",
                &["target"],
            ),
            registry: r,
        }
    }

    pub fn target(&self, target: &str) -> TargetMetrics {
        TargetMetrics {
            ok: self.deliveries.with_label_values(&[target, "ok"]),
            retry: self.deliveries.with_label_values(&[target, "retry"]),
            dead: self.deliveries.with_label_values(&[target, "dead"]),
            superseded: self.deliveries.with_label_values(&[target, "superseded"]),
            filtered: self.deliveries.with_label_values(&[target, "filtered"]),
            duration: self.delivery_duration.with_label_values(&[target]),
            end_to_end: self.end_to_end.with_label_values(&[target]),
            inflight: self.inflight.with_label_values(&[target]),
            breaker_open: self.breaker_open.with_label_values(&[target]),
        }
    }

    pub fn node(&self, node: &str) -> NodeMetrics {
        NodeMetrics {
            accepted: self.changes_accepted.with_label_values(&[node]),
            rejected: self.changes_rejected.with_label_values(&[node]),
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::with_capacity(16 * 1024);
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding into a Vec cannot fail");
        String::from_utf8(out).expect("Prometheus text is UTF-8")
    }
}
