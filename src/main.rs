//! The `lxbridge` command: argument parsing, then the library does the work.

use anyhow::Context;
use clap::{Parser, Subcommand};
use lxbridge::admin::cli;
use lxbridge::config::Config;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "lxbridge",
    version,
    about = "Carries 1C:Enterprise object changes between bases through RabbitMQ"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args)]
struct ConfigArg {
    /// Config file (TOML).
    #[arg(long, short, env = "LXBRIDGE_CONFIG", default_value = "lxbridge.toml")]
    config: PathBuf,
}

#[derive(Subcommand)]
enum Command {
    /// Run the service until SIGTERM/SIGINT.
    Run(ConfigArg),
    /// Check a config file and print every problem; exits 64 if there are any.
    Validate(ConfigArg),
    /// Print a commented example config that validates.
    GenerateConfig,
    /// Print an object's status per target and its history.
    Status {
        #[command(flatten)]
        config: ConfigArg,
        /// The object's ref.
        reference: String,
    },
}

/// sysexits.h EX_USAGE / EX_DATAERR-style code for a bad config, as API.md fixes.
const EXIT_CONFIG: u8 = 64;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::GenerateConfig => {
            print!("{}", lxbridge::config::EXAMPLE);
            ExitCode::SUCCESS
        }
        Command::Validate(args) => match Config::load(&args.config) {
            Ok(config) => {
                let problems = config.validate();
                if problems.is_empty() {
                    println!("{}: ok", args.config.display());
                    ExitCode::SUCCESS
                } else {
                    for p in &problems {
                        println!("{}: {p}", args.config.display());
                    }
                    ExitCode::from(EXIT_CONFIG)
                }
            }
            Err(e) => {
                println!("{e}");
                ExitCode::from(EXIT_CONFIG)
            }
        },
        Command::Run(args) => report(run(args)),
        Command::Status { config, reference } => report(admin_call(config, move |c| {
            let path = format!("/api/v1/objects/{}", cli::encode_segment(&reference));
            (c, reqwest::Method::GET, path, None)
        })),
    }
}

fn report(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lxbridge: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

fn run(args: ConfigArg) -> anyhow::Result<()> {
    let config = Config::load(&args.config)?;
    init_logging(&config.server.log_format);
    runtime()?.block_on(lxbridge::app::run(config))?;
    Ok(())
}

type Call = (Config, reqwest::Method, String, Option<serde_json::Value>);

fn admin_call(args: ConfigArg, build: impl FnOnce(Config) -> Call) -> anyhow::Result<()> {
    let config = Config::load(&args.config)?;
    let (config, method, path, body) = build(config);
    let out = runtime()?.block_on(cli::call(&config, method, &path, body))?;
    println!("{out}");
    Ok(())
}

fn init_logging(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,lapin=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}
