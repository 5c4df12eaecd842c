//! RabbitMQ itself stopped and started (`rabbitmqctl stop_app` / `start_app`) under load.
//! This disturbs every connection to the broker, so it lives in the serial binary (cargo
//! runs test binaries one after another) and takes its turn ([`crate::TURN`]) like the
//! cluster tests.

use crate::common::*;
use crate::TURN;
use serde_json::{json, Value};
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Starts the RabbitMQ app again even if the test panics halfway.
struct StartAppOnDrop;

impl Drop for StartAppOnDrop {
    fn drop(&mut self) {
        let _ = std::process::Command::new("rabbitmqctl")
            .arg("start_app")
            .output();
    }
}

fn rabbitmqctl(arg: &str) {
    let out = std::process::Command::new("rabbitmqctl")
        .arg(arg)
        .output()
        .expect("rabbitmqctl runs");
    assert!(
        out.status.success(),
        "rabbitmqctl {arg}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_stop_and_start_under_10k_load_loses_nothing() {
    let _turn = TURN.lock().await;
    let target = Target::start().await;
    let template = format!(
        r#"
[server]
listen = "127.0.0.1:0"
[broker]
url = "{{amqp}}"
prefix = "{{prefix}}"
[store]
redis_url = "{{redis}}"
[retry]
delays = ["200ms", "1s", "2s", "5s", "10s"]
[[node]]
name = "central"
token = "central-secret"
[[node]]
name = "shop"
token = "shop-secret"
deliver = {{ mode = "push", url = "{}", batch_max = 100, concurrency = 4 }}
[[route]]
from = "central"
to = ["shop"]
"#,
        target.url()
    );
    let bridge = Arc::new(Bridge::start(Backend::Rabbit, "restart", &template).await);
    let accepted = Arc::new(Mutex::new(HashSet::<String>::new()));
    let saw_503 = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicUsize::new(0));

    // A client that retries each request of 100 changes until it is accepted.
    let load = {
        let (bridge, accepted, saw_503, sent) = (
            bridge.clone(),
            accepted.clone(),
            saw_503.clone(),
            sent.clone(),
        );
        tokio::spawn(async move {
            for r in 0..100 {
                let items: Vec<Value> = (r * 100..r * 100 + 100)
                    .map(|i| json!({"id": format!("k-{i}"), "type": "Catalog.X", "ref": format!("k-{i}"), "data": {"i": i}}))
                    .collect();
                let body = Value::Array(items);
                let start = Instant::now();
                loop {
                    let (status, answer) = match bridge
                        .http
                        .post(bridge.url("/api/v1/nodes/central/changes"))
                        .bearer_auth("central-secret")
                        .header("content-type", "application/json")
                        .body(body.to_string())
                        .send()
                        .await
                    {
                        Ok(resp) => {
                            let status = resp.status().as_u16();
                            (
                                status,
                                serde_json::from_str::<Value>(&resp.text().await.unwrap()).unwrap(),
                            )
                        }
                        Err(e) => panic!("ingress unreachable: {e}"),
                    };
                    if status == 202 {
                        let mut acc = accepted.lock().unwrap();
                        for item in answer["results"].as_array().unwrap() {
                            acc.insert(item["id"].as_str().unwrap().to_string());
                        }
                        break;
                    }
                    assert_eq!(status, 503, "{answer}");
                    saw_503.store(true, Ordering::SeqCst);
                    assert!(
                        start.elapsed() < Duration::from_secs(120),
                        "ingress never recovered"
                    );
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                sent.fetch_add(100, Ordering::SeqCst);
            }
        })
    };

    eventually(
        Duration::from_secs(60),
        "2000 changes accepted before the restart",
        || sent.load(Ordering::SeqCst) >= 2000,
    )
    .await;
    let _guard = StartAppOnDrop;
    tokio::task::spawn_blocking(|| rabbitmqctl("stop_app"))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    tokio::task::spawn_blocking(|| rabbitmqctl("start_app"))
        .await
        .unwrap();
    load.await.expect("load finished");

    assert!(
        saw_503.load(Ordering::SeqCst),
        "ingress answered 503 while RabbitMQ was away"
    );
    let want = accepted.lock().unwrap().clone();
    assert_eq!(want.len(), 10_000);
    eventually(
        Duration::from_secs(120),
        "all 10,000 accepted changes delivered",
        || target.distinct_ids().len() == 10_000,
    )
    .await;
    let got = target.distinct_ids();
    assert!(want.iter().all(|id| got.contains(id)));
    // In the target's view (by change id) each arrived once; report raw repeats for the record.
    let repeats: usize = target.id_counts().values().map(|n| n - 1).sum();
    println!("raw repeats at the target (absorbed by id): {repeats}");
    assert_eq!(queue_len(&format!("{}.dlq.shop", bridge.prefix)).await, 0);
    match Arc::try_unwrap(bridge) {
        Ok(bridge) => bridge.finish().await,
        Err(_) => panic!("bridge still shared"),
    }
}
