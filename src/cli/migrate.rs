//! `lxbridge export` and `lxbridge import`: the entries of [`crate::migrate`], which does
//! the work. Only problems are logged (stderr, beside import's summary).

use super::{init_logging, runtime, ConfigArg};
use crate::config::{Config, LogFormat};
use std::path::PathBuf;

// `lxbridge export` (its help is the `Command::Export` doc).
#[derive(clap::Args)]
pub struct ExportArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// Write here instead of stdout.
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
}

// `lxbridge import` (its help is the `Command::Import` doc).
#[derive(clap::Args)]
pub struct ImportArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// Read from here instead of stdin.
    #[arg(long = "in", value_name = "FILE")]
    pub input: Option<PathBuf>,
}

/// `lxbridge export`.
pub fn export(args: &ExportArgs) -> anyhow::Result<()> {
    let config = load(&args.config)?;
    runtime()?.block_on(crate::migrate::export(&config, args.out.as_deref()))
}

/// `lxbridge import`.
pub fn import(args: &ImportArgs) -> anyhow::Result<()> {
    let config = load(&args.config)?;
    runtime()?.block_on(crate::migrate::import(&config, args.input.as_deref()))
}

/// The config, with logging of problems only.
fn load(args: &ConfigArg) -> anyhow::Result<Config> {
    let config = Config::load(&args.config)?;
    init_logging(LogFormat::Text, "warn,lapin=warn,lapin::channels=off");
    Ok(config)
}
