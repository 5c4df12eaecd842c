//! The lxbridge under test: its generated config, starting it (ready when `/readyz` says
//! so), stopping it, its resource use, and removing what it left in RabbitMQ, Redis or its
//! embedded data folder.

use crate::Args;
use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
use lapin::{Connection, ConnectionProperties};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The lxbridge binary: `--bridge-bin`, or `lxbridge` next to lxbench.
pub(crate) fn bridge_bin(args: &Args) -> String {
    args.bridge_bin.clone().unwrap_or_else(|| {
        std::env::current_exe()
            .expect("own path")
            .with_file_name("lxbridge")
            .display()
            .to_string()
    })
}

/// Peak RSS (VmHWM) in MB and CPU seconds (user + system) of a process.
pub(crate) fn process_usage(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let hwm_kb: f64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = after.split_whitespace().collect();
    // after ")": state is field 3 → index 0; utime is field 14 → index 11, stime 15 → 12
    let ticks: f64 = fields
        .get(11)
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0)
        + fields
            .get(12)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0);
    (hwm_kb / 1024.0, ticks / 100.0)
}

/// Where an embedded lxbridge of this run keeps its database.
fn embedded_dir(prefix: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(prefix)
}

/// The backend sections of a config: RabbitMQ + Redis, or embedded.
pub(crate) fn backend_toml(prefix: &str, args: &Args) -> String {
    if args.backend == "embedded" {
        format!(
            "[embedded]\ndata_dir = {:?}\n",
            embedded_dir(prefix).display().to_string()
        )
    } else {
        format!(
            "[broker]\nurl = \"{}\"\nprefix = \"{prefix}\"\n[store]\nredis_url = \"{}\"\n",
            args.amqp, args.redis
        )
    }
}

fn bridge_config(prefix: &str, port: u16, sink: &str, args: &Args) -> String {
    let backend = backend_toml(prefix, args);
    if args.pull_latency {
        return format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\n{backend}\
             [[node]]\nname = \"central\"\ntoken = \"bench\"\n[[node]]\nname = \"sink0\"\ntoken = \"x\"\n\
             deliver = {{ mode = \"pull\", batch_max = 100 }}\n[[route]]\nfrom = \"central\"\nto = [\"sink0\"]\n"
        );
    }
    let mut toml = format!(
        r#"[server]
listen = "127.0.0.1:{port}"
{backend}[retry]
delays = ["1s", "10s"]
[[node]]
name = "central"
token = "bench"
"#
    );
    let mut targets = Vec::new();
    for t in 0..args.targets {
        toml.push_str(&format!(
            "[[node]]\nname = \"sink{t}\"\ntoken = \"x\"\ndeliver = {{ mode = \"push\", url = \"{sink}/{t}\", batch_max = 100, concurrency = 8, gzip = false }}\n"
        ));
        targets.push(format!("\"sink{t}\""));
    }
    toml.push_str(&format!(
        "[[route]]\nfrom = \"central\"\nto = [{}]\n",
        targets.join(", ")
    ));
    toml
}

pub(crate) struct Bridge {
    pub(crate) child: Child,
    pub(crate) base: String,
    config_path: std::path::PathBuf,
}

impl Bridge {
    pub(crate) async fn start(bin: &str, prefix: &str, sink: &str, args: &Args) -> Bridge {
        Bridge::start_with(bin, prefix, |port| bridge_config(prefix, port, sink, args)).await
    }

    /// Starts lxbridge on a free port with the config `config(port)` gives.
    pub(crate) async fn start_with(
        bin: &str,
        prefix: &str,
        config: impl FnOnce(u16) -> String,
    ) -> Bridge {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let config_path = std::env::temp_dir().join(format!("{prefix}.toml"));
        std::fs::write(&config_path, config(port)).expect("write bench config");
        let child = Command::new(bin)
            .args(["run", "--config"])
            .arg(&config_path)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start {bin}: {e} (build it with cargo build --release)")
            });
        let base = format!("http://127.0.0.1:{port}");
        let client = reqwest::Client::new();
        let start = Instant::now();
        loop {
            if let Ok(r) = client.get(format!("{base}/readyz")).send().await {
                if r.status() == 200 {
                    break;
                }
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "lxbridge not ready: are RabbitMQ and Redis up?"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Bridge {
            child,
            base,
            config_path,
        }
    }

    pub(crate) fn stop(mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.config_path);
    }
}

pub(crate) async fn cleanup(args: &Args, prefix: &str) {
    cleanup_after(
        args,
        prefix,
        &bridge_config(prefix, 0, "http://127.0.0.1:1", args),
    )
    .await
}

/// Removes what an lxbridge run with `config` left in RabbitMQ, Redis or its data folder.
pub(crate) async fn cleanup_after(args: &Args, prefix: &str, config: &str) {
    if args.backend == "embedded" {
        let _ = std::fs::remove_dir_all(embedded_dir(prefix));
        return;
    }
    if let Ok(conn) = Connection::connect(&args.amqp, ConnectionProperties::default()).await {
        if let Ok(ch) = conn.create_channel().await {
            // What the bridge declared for the config it ran with, and the baseline's queue.
            let config =
                lxbridge::config::Config::parse(config, "bench").expect("the bench config parses");
            let (exchanges, mut queues) = lxbridge::broker::declared_names(&config);
            queues.push(format!("{prefix}.baseline"));
            for x in exchanges {
                let _ = ch
                    .exchange_delete(x.as_str().into(), ExchangeDeleteOptions::default())
                    .await;
            }
            for q in queues {
                let _ = ch
                    .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                    .await;
            }
        }
        let _ = conn.close(200, "bench done".into()).await;
    }
    if let Ok(client) = redis::Client::open(args.redis.as_str()) {
        if let Ok(mut c) = client.get_multiplexed_async_connection().await {
            let keys: Vec<String> = redis::cmd("KEYS")
                .arg(format!("{prefix}:*"))
                .query_async(&mut c)
                .await
                .unwrap_or_default();
            for chunk in keys.chunks(1000) {
                let _: Result<(), _> = redis::cmd("DEL").arg(chunk).query_async(&mut c).await;
            }
        }
    }
}
