//! The serial suite, one binary of tests that must not run beside any other: they stop and
//! start the machine's RabbitMQ (`broker_restart`) or start private RabbitMQ clusters,
//! Redis servers and sentinels (`cluster`), which would disturb or starve the tests around
//! them. Cargo runs test binaries one after another, so nothing of `tests/it` runs beside
//! them; within this binary every test holds [`TURN`] for its whole run, so they take turns
//! even though libtest starts them on parallel threads (no `--test-threads=1` needed).

#[path = "../common/mod.rs"]
mod common;
#[path = "../fleet/mod.rs"]
mod fleet;
#[path = "../servers/mod.rs"]
mod servers;

mod broker_restart;
mod cluster;

/// One test at a time in this binary: every test takes it first (`let _turn =
/// TURN.lock().await;`, or `TURN.blocking_lock()` in a plain `#[test]`) and holds it to the
/// end; `structure::serial_tests_take_their_turn` (tests/it) checks that they do. A tokio
/// mutex: the guard is held across awaits, it works across each test's own runtime, and a
/// test that panics releases it while unwinding.
static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
