//! `lxbridge demo --exit`, the real binary: with nothing else running (it uses the embedded
//! backend only, no RabbitMQ, no Redis) it shows a delivered change, a dead-lettered one with
//! its error, and the URLs to look at, exits 0 and removes its temporary data folder.

use crate::servers::free_port;
use std::io::Read;
use std::process::{Command, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_lxbridge");
/// The demo waits at most 10 s for its changes; this is the whole run's limit.
const RUN_LIMIT: Duration = Duration::from_secs(60);

fn read_all(mut pipe: impl Read + Send + 'static) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = pipe.read_to_end(&mut bytes);
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

#[test]
fn demo_shows_a_delivered_and_a_dead_lettered_change() {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut child = Command::new(BIN)
        .args(["demo", "--exit", "--listen", &listen])
        .env_remove("LXBRIDGE_CONFIG")
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the lxbridge binary runs");
    let pid = child.id();
    // Read both pipes while the demo runs, so a full pipe can never stall it.
    let stdout = read_all(child.stdout.take().expect("stdout piped"));
    let stderr = read_all(child.stderr.take().expect("stderr piped"));

    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting for lxbridge demo") {
            break status;
        }
        if started.elapsed() > RUN_LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("lxbridge demo --exit did not stop within {RUN_LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let stdout = stdout.join().expect("the stdout reader");
    let stderr = stderr.join().expect("the stderr reader");
    let shown = format!("exit: {status}\n--- stdout\n{stdout}\n--- stderr\n{stderr}");

    assert!(status.success(), "lxbridge demo --exit failed:\n{shown}");
    let line_with = |words: &[&str]| {
        stdout
            .lines()
            .any(|line| words.iter().all(|w| line.contains(w)))
    };
    assert!(
        line_with(&[
            "delivered",
            "Catalog.Номенклатура",
            "5f1c2a3e-8d4b-11ee-b9d1-0242ac120002"
        ]),
        "no delivered change shown:\n{shown}"
    );
    assert!(
        line_with(&[
            "dead",
            "Document.ЗаказКлиента",
            "b5c6d7e8-8d4b-11ee-b9d1-0242ac120002"
        ]),
        "no dead-lettered change shown:\n{shown}"
    );
    assert!(
        line_with(&["error:", "warehouse", "does not exist in the site"]),
        "the dead change's error is not shown:\n{shown}"
    );
    let base = format!("http://{listen}");
    for url in [
        format!("{base}/api/v1/objects/b5c6d7e8-8d4b-11ee-b9d1-0242ac120002"),
        format!("{base}/api/v1/dlq/site"),
        format!("{base}/api/v1/dlq/site/replay"),
        format!("{base}/metrics"),
        format!("{base}/readyz"),
    ] {
        assert!(stdout.contains(&url), "{url} is not shown:\n{shown}");
    }
    let data_dir = std::env::temp_dir().join(format!("lxbridge-demo-{pid}"));
    assert!(
        !data_dir.exists(),
        "the demo's temporary data folder {} is still there",
        data_dir.display()
    );
}
