//! `lxbridge validate`: every problem of a config file, one line each (`<file>: <problem>`),
//! and with `--connect` every server that can't be reached; exit 64 when there is one.

use super::{runtime, ConfigArg, EXIT_CONFIG};
use crate::config::Config;
use std::process::ExitCode;

// `lxbridge validate` (its help is the `Command::Validate` doc).
#[derive(clap::Args)]
pub struct ValidateArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// Also connect to every RabbitMQ node of broker.url and to the store (TLS and
    /// Sentinel included), and print each that can't be reached, with the reason.
    #[arg(long)]
    pub connect: bool,
}

/// `lxbridge validate`: the problems [`Config::check`] finds (reading the file and checking
/// its values), then, only if there are none and `--connect` asks, the servers that can't be
/// reached.
pub fn validate(args: &ValidateArgs) -> ExitCode {
    let path = &args.config.config;
    let problems = match Config::check(path) {
        Err(problems) => problems,
        Ok(config) if args.connect => match runtime() {
            Ok(rt) => rt.block_on(crate::app::probe(&config)),
            Err(e) => vec![e.to_string()],
        },
        Ok(_) => Vec::new(),
    };
    for p in &problems {
        println!("{}: {p}", path.display());
    }
    if problems.is_empty() {
        println!("{}: ok", path.display());
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_CONFIG)
    }
}
