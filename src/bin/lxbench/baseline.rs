//! The raw-RabbitMQ baseline each scenario is compared with.

use crate::{latency_summary, round3, Args};
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::time::Instant;

/// Raw RabbitMQ: N persistent messages of S bytes, confirmed publishes to a quorum queue
/// (a window of 1000 unconfirmed), one consumer acking each; delivered/s until the last arrives.
pub(crate) async fn run_baseline(args: &Args) -> Value {
    let queue = format!("lxbench-{}-{}.baseline", std::process::id(), args.name);
    let publisher = Connection::connect(&args.amqp, ConnectionProperties::default())
        .await
        .expect("RabbitMQ");
    let consumer_conn = Connection::connect(&args.amqp, ConnectionProperties::default())
        .await
        .expect("RabbitMQ");
    let pch = publisher.create_channel().await.unwrap();
    let mut qargs = FieldTable::default();
    qargs.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    pch.queue_declare(
        queue.as_str().into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        qargs,
    )
    .await
    .unwrap();
    pch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let cch = consumer_conn.create_channel().await.unwrap();
    cch.basic_qos(1000, BasicQosOptions::default())
        .await
        .unwrap();
    let mut consumer = cch
        .basic_consume(
            queue.as_str().into(),
            "lxbench".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let n = args.n;
    let epoch = Instant::now();
    let consumed = tokio::spawn(async move {
        let mut latencies = Vec::with_capacity(n);
        let mut count = 0;
        while count < n {
            let Some(Ok(d)) = consumer.next().await else {
                break;
            };
            let sent: u64 = std::str::from_utf8(&d.data[..20])
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .unwrap_or(0);
            latencies
                .push((epoch.elapsed().as_micros() as u64).saturating_sub(sent) as f64 / 1000.0);
            d.ack(BasicAckOptions::default()).await.unwrap();
            count += 1;
        }
        (count, epoch.elapsed(), latencies)
    });
    let start = Instant::now();
    let mut window = VecDeque::with_capacity(1000);
    for _ in 0..n {
        let mut payload = format!("{:<20}", epoch.elapsed().as_micros()).into_bytes();
        payload.resize(args.size.max(20), b'x');
        let confirm = pch
            .basic_publish(
                "".into(),
                queue.as_str().into(),
                BasicPublishOptions::default(),
                &payload,
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .unwrap();
        window.push_back(confirm);
        if window.len() >= 1000 {
            window.pop_front().unwrap().await.unwrap();
        }
    }
    for c in window {
        c.await.unwrap();
    }
    let publish_secs = start.elapsed().as_secs_f64();
    let (count, done, mut latencies) = consumed.await.unwrap();
    let total_secs = (done - start.duration_since(epoch)).as_secs_f64();
    latencies.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let _ = pch
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await;
    let _ = publisher.close(200, "".into()).await;
    let _ = consumer_conn.close(200, "".into()).await;
    json!({
        "published_per_s": round3(n as f64 / publish_secs),
        "delivered_per_s": round3(count as f64 / total_secs),
        "latency_publish_to_consume_ms": latency_summary(&latencies),
    })
}
