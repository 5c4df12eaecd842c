//! The integration suite, one binary: every test that can run beside the others. Each module
//! is one area (`pipeline`, `pull`, `failures`, …) and its tests are `module::name`, or
//! `module::rabbitmq::name` and `module::embedded::name` for those run on both backends
//! ([`both_backends!`]). `cargo test --test it pull::` runs one area.
//!
//! The harness is shared with the serial binary (`tests/serial`): `common` (lxbridge on
//! port 0, the target server, the TCP proxy), `fleet` (lxbridge processes, several
//! instances), `servers` (private RabbitMQ/Redis servers, free ports). Fixtures are in
//! `tests/fixtures/`.
//!
//! A test that stops the machine's RabbitMQ or Redis, or starts heavy private clusters,
//! belongs in `tests/serial`, not here: these tests run side by side.

#[macro_use]
#[path = "../common/mod.rs"]
mod common;
#[path = "../fleet/mod.rs"]
mod fleet;
#[path = "../servers/mod.rs"]
mod servers;

mod bad_input;
mod cli;
mod cml_site;
mod commerceml;
mod crm;
mod crm_rest;
mod demo;
mod docs;
mod failures;
mod faults;
mod groups;
mod instances;
mod migrate;
mod observability;
mod pipeline;
mod pull;
mod store_loss;
mod structure;
mod transforms;
