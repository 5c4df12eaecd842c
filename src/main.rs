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
    Validate {
        #[command(flatten)]
        config: ConfigArg,
        /// Also connect to every RabbitMQ node of broker.url and to the store (TLS and
        /// Sentinel included), and print each that can't be reached, with the reason.
        #[arg(long)]
        connect: bool,
    },
    /// Print a commented example config that validates.
    GenerateConfig,
    /// List, replay or purge a target's dead-letter queue.
    Dlq {
        #[command(subcommand)]
        action: DlqAction,
    },
    /// Print, for each target of a route, a change (read from stdin) as that target would
    /// receive it, or why it would be filtered.
    Transform {
        #[command(flatten)]
        config: ConfigArg,
        /// The route's `name`.
        #[arg(long)]
        route: String,
    },
    /// Show lxbridge at work with nothing else installed: the embedded backend, a built-in
    /// demo target and a few sample 1C changes (one is refused and dead-lettered). Prints
    /// what happened and the URLs to look at, then runs until Ctrl-C.
    Demo {
        /// Where lxbridge listens.
        #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8080")]
        listen: String,
        /// The folder for the demo's database and config, kept after exit [default: a fresh
        /// folder under the system temp dir, removed on exit].
        #[arg(long, value_name = "DIR")]
        data_dir: Option<PathBuf>,
        /// Print the report and stop, instead of running until Ctrl-C.
        #[arg(long)]
        exit: bool,
    },
    /// Copy the changes the backend holds (pending and dead) as JSON lines, for `import`.
    ///
    /// One line per message, for every target: waiting in its delivery queue, waiting out a
    /// retry step, or dead in its DLQ. Nothing is taken or changed. Stop lxbridge first: the
    /// embedded backend refuses while it runs (its database is locked); on RabbitMQ a running
    /// lxbridge holds the changes it has prefetched unacked, where export can't see them, so
    /// export refuses while a delivery queue has a consumer.
    Export {
        #[command(flatten)]
        config: ConfigArg,
        /// Write here instead of stdout.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// Put changes written by `lxbridge export` into the backend (another one, usually).
    ///
    /// Every line is checked first; nothing is imported unless all are valid. Then, per
    /// target, waiting and retrying changes go to the end of its delivery queue (a retry is
    /// due at once) with their attempt count, and dead ones into its DLQ with their error,
    /// where `lxbridge dlq list/replay` take them. Prints a summary per target to stderr.
    /// Statuses, history, idempotency keys, delivery marks, the remap table and inbox
    /// numbers are not carried.
    Import {
        #[command(flatten)]
        config: ConfigArg,
        /// Read from here instead of stdin.
        #[arg(long = "in", value_name = "FILE")]
        input: Option<PathBuf>,
    },
    /// Ask a member of a group to send its snapshot so that another member is fed again
    /// (a new or restored copy): the member `--from` receives a change of type
    /// `lxbridge.Resync` and answers by sending every object of the group's types with
    /// `"initial": true`.
    Resync {
        #[command(flatten)]
        config: ConfigArg,
        /// The group's name.
        #[arg(long)]
        group: String,
        /// The member to feed again.
        #[arg(long)]
        node: String,
        /// The member that sends its snapshot [default: the first other member].
        #[arg(long)]
        from: Option<String>,
    },
    /// Print an object's status per target and its history.
    Status {
        #[command(flatten)]
        config: ConfigArg,
        /// The object's ref.
        reference: String,
    },
}

#[derive(Subcommand)]
enum DlqAction {
    /// Print the DLQ's count and items.
    List {
        #[command(flatten)]
        config: ConfigArg,
        #[arg(long)]
        target: String,
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Send dead changes (all, or those given with --id) back for delivery at attempt 1.
    Replay {
        #[command(flatten)]
        config: ConfigArg,
        #[arg(long)]
        target: String,
        #[arg(long = "id")]
        ids: Vec<String>,
    },
    /// Delete dead changes (all, or those given with --id).
    Purge {
        #[command(flatten)]
        config: ConfigArg,
        #[arg(long)]
        target: String,
        #[arg(long = "id")]
        ids: Vec<String>,
    },
}

fn selection(ids: Vec<String>) -> Option<serde_json::Value> {
    Some(if ids.is_empty() {
        serde_json::json!({})
    } else {
        serde_json::json!({ "ids": ids })
    })
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
        Command::Validate { config, connect } => validate(&config.config, connect),
        Command::Run(args) => report(run(args)),
        Command::Dlq { action } => report(match action {
            DlqAction::List {
                config,
                target,
                limit,
            } => admin_call(config, move |c| {
                let path = format!("/api/v1/dlq/{}?limit={limit}", cli::encode_segment(&target));
                (c, reqwest::Method::GET, path, None)
            }),
            DlqAction::Replay {
                config,
                target,
                ids,
            } => admin_call(config, move |c| {
                let path = format!("/api/v1/dlq/{}/replay", cli::encode_segment(&target));
                (c, reqwest::Method::POST, path, selection(ids))
            }),
            DlqAction::Purge {
                config,
                target,
                ids,
            } => admin_call(config, move |c| {
                let path = format!("/api/v1/dlq/{}", cli::encode_segment(&target));
                (c, reqwest::Method::DELETE, path, selection(ids))
            }),
        }),
        Command::Transform { config, route } => report(transform(config, &route)),
        Command::Resync {
            config,
            group,
            node,
            from,
        } => report(admin_call(config, move |c| {
            let path = format!("/api/v1/groups/{}/resync", cli::encode_segment(&group));
            let body = match from {
                Some(from) => serde_json::json!({"node": node, "from": from}),
                None => serde_json::json!({"node": node}),
            };
            (c, reqwest::Method::POST, path, Some(body))
        })),
        Command::Demo {
            listen,
            data_dir,
            exit,
        } => report(demo(lxbridge::demo::Options {
            listen,
            data_dir,
            exit,
        })),
        Command::Export { config, out } => report(
            migration(config)
                .and_then(|(c, rt)| rt.block_on(lxbridge::migrate::export(&c, out.as_deref()))),
        ),
        Command::Import { config, input } => report(
            migration(config)
                .and_then(|(c, rt)| rt.block_on(lxbridge::migrate::import(&c, input.as_deref()))),
        ),
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

/// `lxbridge validate`: every problem of the file, and with `connect` of reaching the
/// servers, one line each; exit 64 when there is one.
fn validate(path: &std::path::Path, connect: bool) -> ExitCode {
    let config = match Config::load(path) {
        Ok(config) => config,
        Err(e) => {
            println!("{e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let mut problems = config.validate();
    if connect && problems.is_empty() {
        match runtime() {
            Ok(rt) => problems.extend(rt.block_on(lxbridge::app::probe(&config))),
            Err(e) => problems.push(e.to_string()),
        }
    }
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

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

fn run(args: ConfigArg) -> anyhow::Result<()> {
    let config = Config::load(&args.config)?;
    init_logging(
        &config.server.log_format,
        "info,lapin=warn,lapin::channels=off",
    );
    runtime()?.block_on(lxbridge::app::run(config))?;
    Ok(())
}

fn demo(options: lxbridge::demo::Options) -> anyhow::Result<()> {
    // Only problems on stderr: the report on stdout is what the demo shows.
    init_logging("text", "warn");
    runtime()?.block_on(lxbridge::demo::run(options))
}

fn transform(args: ConfigArg, route: &str) -> anyhow::Result<()> {
    use std::io::Read;
    let config = Config::load(&args.config)?;
    let mut input = String::new();
    std::io::stdin()
        .read_to_string(&mut input)
        .context("cannot read the change from stdin")?;
    let lines =
        lxbridge::admin::preview::run(&config, route, &input).map_err(anyhow::Error::msg)?;
    for line in lines {
        println!("{line}");
    }
    Ok(())
}

/// For `export`/`import`: the config and a runtime; only problems are logged (stderr, next
/// to the summary).
fn migration(args: ConfigArg) -> anyhow::Result<(Config, tokio::runtime::Runtime)> {
    let config = Config::load(&args.config)?;
    init_logging("text", "warn,lapin=warn,lapin::channels=off");
    Ok((config, runtime()?))
}

type Call = (Config, reqwest::Method, String, Option<serde_json::Value>);

fn admin_call(args: ConfigArg, build: impl FnOnce(Config) -> Call) -> anyhow::Result<()> {
    let config = Config::load(&args.config)?;
    let (config, method, path, body) = build(config);
    let out = runtime()?.block_on(cli::call(&config, method, &path, body))?;
    println!("{out}");
    Ok(())
}

/// Logs to stderr; `RUST_LOG` overrides `default_filter`. (For `run`, lapin::channels is off:
/// it logs an ERROR for every connection closed at shutdown; connection failures that matter
/// are logged by lxbridge::broker itself.)
fn init_logging(format: &str, default_filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}
