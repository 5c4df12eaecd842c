//! The `lxbridge` command line: the clap types ([`Cli`], [`Command`]) and one function per
//! mode, which `src/main.rs` calls after parsing. It is a library module so that a test can
//! parse any `lxbridge …` line with `lxbridge::cli::Cli::try_parse_from`.
//!
//! The modes: `run` and `generate-config` here; `validate` in [`validate`]; `transform` in
//! [`transform`]; `export`/`import` in [`migrate`]; `status`, `dlq …` and `resync` (calls to
//! a running lxbridge's admin API) in [`admin`]; `demo` in [`demo`]. Errors are reported
//! with `anyhow` here, as a binary does: a mode returns [`anyhow::Result`] and [`report`]
//! prints it.

pub mod admin;
pub mod demo;
pub mod migrate;
pub mod transform;
pub mod validate;

use crate::config::{Config, LogFormat};
use anyhow::Context;
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "lxbridge",
    version,
    about = "Carries 1C:Enterprise object changes between bases and sites, through RabbitMQ \
             and Redis or (the default) an embedded SQLite database",
    long_about = "Carries 1C:Enterprise object changes between bases and sites.\n\n\
                  Through RabbitMQ and Redis when the config has a [broker] section or \
                  store.redis_url (or store.sentinels); otherwise through the embedded \
                  backend, one SQLite database in embedded.data_dir, with nothing else to \
                  install."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

// The config file option every mode that reads one takes.
#[derive(clap::Args)]
pub struct ConfigArg {
    /// Config file (TOML).
    #[arg(long, short, env = "LXBRIDGE_CONFIG", default_value = "lxbridge.toml")]
    pub config: PathBuf,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the service until SIGTERM/SIGINT.
    Run(ConfigArg),
    /// Check a config file and print every problem; exits 64 if there are any.
    Validate(validate::ValidateArgs),
    /// Print a commented example config that validates.
    GenerateConfig,
    /// List, replay or purge a target's dead-letter queue; needs a running lxbridge.
    ///
    /// Asks the admin API of the lxbridge at server.listen of the config, with admin.token.
    Dlq {
        #[command(subcommand)]
        action: admin::DlqAction,
    },
    /// Print, for each target of a route, a change (read from stdin) as that target would
    /// receive it, or why it would be filtered.
    Transform(transform::TransformArgs),
    /// Show lxbridge at work with nothing else installed: the embedded backend, a built-in
    /// demo target and a few sample 1C changes (one is refused and dead-lettered). Prints
    /// what happened and the URLs to look at, then runs until Ctrl-C.
    Demo(demo::Options),
    /// Copy the changes the backend holds (pending and dead) as JSON lines, for `import`.
    ///
    /// One line per message, for every target: waiting in its delivery queue, waiting out a
    /// retry step, or dead in its DLQ. Nothing is taken or changed. Stop lxbridge first: the
    /// embedded backend refuses while it runs (its database is locked); on RabbitMQ a running
    /// lxbridge holds the changes it has prefetched unacked, where export can't see them, so
    /// export refuses while a delivery queue has a consumer.
    Export(migrate::ExportArgs),
    /// Put changes written by `lxbridge export` into the backend (another one, usually).
    ///
    /// Every line is checked first; nothing is imported unless all are valid. Then, per
    /// target, waiting and retrying changes go to the end of its delivery queue (a retry is
    /// due at once) with their attempt count, and dead ones into its DLQ with their error,
    /// where `lxbridge dlq list/replay` take them. Prints a summary per target to stderr.
    /// Statuses, history, idempotency keys, delivery marks, the remap table and inbox
    /// numbers are not carried.
    Import(migrate::ImportArgs),
    /// Ask a member of a group to send its snapshot so that another member is fed again
    /// (a new or restored copy): the member `--from` receives a change of type
    /// `lxbridge.Resync` and answers by sending every object of the group's types with
    /// `"initial": true`.
    ///
    /// Needs a running lxbridge: asks the admin API of the one at server.listen of the
    /// config, with admin.token.
    Resync(admin::ResyncArgs),
    /// Print an object's status per target and its history; needs a running lxbridge.
    ///
    /// Asks the admin API of the lxbridge at server.listen of the config, with admin.token.
    Status(admin::StatusArgs),
}

/// sysexits.h EX_USAGE / EX_DATAERR-style code for a bad config, as docs/api.md fixes.
pub const EXIT_CONFIG: u8 = 64;

/// A mode's result as the exit code, its error (with its causes) on stderr.
pub fn report(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lxbridge: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `lxbridge generate-config`.
pub fn generate_config() -> ExitCode {
    print!("{}", crate::config::EXAMPLE);
    ExitCode::SUCCESS
}

/// `lxbridge run`: the service, until SIGTERM/SIGINT.
pub fn run(args: &ConfigArg) -> anyhow::Result<()> {
    let config = Config::load(&args.config)?;
    init_logging(
        config.server.log_format,
        "info,lapin=warn,lapin::channels=off",
    );
    runtime()?.block_on(crate::app::run(config))?;
    Ok(())
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// Logs to stderr; `RUST_LOG` overrides `default_filter`. (For `run`, lapin::channels is off:
/// it logs an ERROR for every connection closed at shutdown; connection failures that matter
/// are logged by lxbridge::broker itself.)
fn init_logging(format: LogFormat, default_filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }

    fn long_help(path: &[&str]) -> String {
        let mut command = Cli::command();
        for name in path {
            command = command
                .find_subcommand(name)
                .unwrap_or_else(|| panic!("no subcommand {name}"))
                .clone();
        }
        command.render_long_help().to_string()
    }

    #[test]
    fn the_help_names_both_backends_and_what_needs_a_running_lxbridge() {
        let top = long_help(&[]);
        for word in ["RabbitMQ and Redis", "embedded", "SQLite", "[broker]"] {
            assert!(top.contains(word), "{word:?} not in:\n{top}");
        }
        for path in [&["status"][..], &["dlq"], &["dlq", "list"], &["resync"]] {
            let help = long_help(path);
            assert!(
                help.contains("running lxbridge"),
                "{path:?} doesn't say it needs a running lxbridge:\n{help}"
            );
        }
    }

    #[test]
    fn every_mode_parses() {
        for line in [
            &["lxbridge", "run"][..],
            &["lxbridge", "run", "-c", "x.toml"],
            &["lxbridge", "validate", "--config", "x.toml", "--connect"],
            &["lxbridge", "generate-config"],
            &[
                "lxbridge", "dlq", "list", "--target", "shop", "--limit", "5",
            ],
            &["lxbridge", "dlq", "replay", "--target", "shop", "--id", "a"],
            &["lxbridge", "dlq", "purge", "--target", "shop"],
            &["lxbridge", "transform", "--route", "orders"],
            &["lxbridge", "demo", "--listen", "127.0.0.1:0", "--exit"],
            &["lxbridge", "demo", "--data-dir", "d"],
            &["lxbridge", "export", "--out", "f.jsonl"],
            &["lxbridge", "import", "--in", "f.jsonl"],
            &[
                "lxbridge", "resync", "--group", "g", "--node", "b", "--from", "a",
            ],
            &["lxbridge", "status", "REF", "--config", "x.toml"],
        ] {
            if let Err(e) = Cli::try_parse_from(line) {
                panic!("{line:?}: {e}");
            }
        }
    }
}
