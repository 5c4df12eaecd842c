//! `lxbridge transform`: a change from stdin as each target of a route would receive it,
//! offline (the work is [`crate::deliver::preview`]'s).

use super::ConfigArg;
use crate::config::Config;
use anyhow::Context;
use std::io::Read;

// `lxbridge transform` (its help is the `Command::Transform` doc).
#[derive(clap::Args)]
pub struct TransformArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// The route's `name`.
    #[arg(long)]
    pub route: String,
}

/// `lxbridge transform --route NAME`: one JSON line per target of the route.
pub fn transform(args: &TransformArgs) -> anyhow::Result<()> {
    let config = Config::load(&args.config.config)?;
    let mut input = String::new();
    std::io::stdin()
        .read_to_string(&mut input)
        .context("cannot read the change from stdin")?;
    let lines =
        crate::deliver::preview::run(&config, &args.route, &input).map_err(anyhow::Error::msg)?;
    for line in lines {
        println!("{line}");
    }
    Ok(())
}
