//! `--pull-latency`: how soon a long-polling pull node gets a change after it was posted.

use crate::bridge::{bridge_bin, cleanup, Bridge};
use crate::{backends, change_json, latency_summary, Args};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A pull node long-polls its inbox (and confirms at once); changes are posted one at a time
/// every 20 ms to an otherwise idle bridge. Latency = POST sent → the poll that carries it
/// returned.
pub(crate) async fn pull_latency(args: &Args) {
    for backend in backends(args) {
        pull_latency_on(&Args {
            backend: backend.to_string(),
            ..args.clone()
        })
        .await;
    }
}

async fn pull_latency_on(args: &Args) {
    let bin = bridge_bin(args);
    let prefix = format!("lxbench-{}-pull-{}", std::process::id(), args.backend);
    let bridge = Bridge::start(&bin, &prefix, "", args).await;
    let client = reqwest::Client::new();
    let n = args.n.min(2_000);
    let epoch = Instant::now();
    let sent: Arc<Vec<AtomicU64>> = Arc::new((0..n).map(|_| AtomicU64::new(0)).collect());
    let got: Arc<Vec<AtomicU64>> = Arc::new((0..n).map(|_| AtomicU64::new(0)).collect());
    let poller = {
        let (client, base, got) = (client.clone(), bridge.base.clone(), got.clone());
        tokio::spawn(async move {
            let mut received = 0;
            while received < n {
                let resp = client
                    .get(format!("{base}/api/v1/nodes/sink0/inbox?limit=100&wait=25"))
                    .bearer_auth("x")
                    .send()
                    .await
                    .expect("inbox");
                let at = epoch.elapsed().as_micros() as u64 + 1;
                let msg: Value = serde_json::from_str(&resp.text().await.unwrap()).unwrap();
                let Some(no) = msg["message_no"].as_i64() else {
                    continue;
                };
                for c in msg["changes"].as_array().unwrap() {
                    let i: usize = c["id"].as_str().unwrap()[1..].parse().unwrap();
                    if got[i]
                        .compare_exchange(0, at, Ordering::SeqCst, Ordering::SeqCst)
                        .is_ok()
                    {
                        received += 1;
                    }
                }
                client
                    .post(format!("{base}/api/v1/nodes/sink0/inbox/ack"))
                    .bearer_auth("x")
                    .header("content-type", "application/json")
                    .body(json!({"message_no": no}).to_string())
                    .send()
                    .await
                    .expect("ack");
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    for i in 0..n {
        sent[i].store(epoch.elapsed().as_micros() as u64 + 1, Ordering::SeqCst);
        let resp = client
            .post(format!("{}/api/v1/nodes/central/changes", bridge.base))
            .bearer_auth("bench")
            .header("content-type", "application/json")
            .body(change_json(i, args.size))
            .send()
            .await
            .expect("ingress");
        assert_eq!(resp.status().as_u16(), 202);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(60), poller).await;
    let mut latencies: Vec<f64> = (0..n)
        .filter(|&i| got[i].load(Ordering::SeqCst) > 0)
        .map(|i| {
            got[i]
                .load(Ordering::SeqCst)
                .saturating_sub(sent[i].load(Ordering::SeqCst)) as f64
                / 1000.0
        })
        .collect();
    latencies.sort_by(|a, b| a.partial_cmp(b).unwrap());
    bridge.stop();
    cleanup(args, &prefix).await;
    println!(
        "{}",
        json!({"scenario": "pull-latency", "backend": args.backend, "n": n, "received": latencies.len(),
               "post_to_poll_return_ms": latency_summary(&latencies)})
    );
}
