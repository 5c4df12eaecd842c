//! The `lxbridge` command: parses the command line and hands each mode to its function in
//! [`lxbridge::cli`], where the work is.

use clap::Parser;
use lxbridge::cli::{self, admin, demo, migrate, transform, validate, Cli, Command};
use std::process::ExitCode;

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Run(args) => cli::report(cli::run(&args)),
        Command::Validate(args) => validate::validate(&args),
        Command::GenerateConfig => cli::generate_config(),
        Command::Dlq { action } => cli::report(admin::dlq(&action)),
        Command::Transform(args) => cli::report(transform::transform(&args)),
        Command::Demo(options) => cli::report(demo::demo(options)),
        Command::Export(args) => cli::report(migrate::export(&args)),
        Command::Import(args) => cli::report(migrate::import(&args)),
        Command::Resync(args) => cli::report(admin::resync(&args)),
        Command::Status(args) => cli::report(admin::status(&args)),
    }
}
