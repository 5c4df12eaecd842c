//! Configuration: the TOML file of docs/api.md, typed, with defaults and `${ENV}` expansion, and
//! checks that report every problem at once (like `vector validate`).
//!
//! The sections' types, one file each: `server` (`[server]`, `[admin]`, `[retry]`),
//! `backend` (`[broker]`, `[store]`, `[embedded]`), `node` (`[[node]]`), `route`
//! (`[[route]]`, `[[group]]`) and `duration` (how a duration is written); all re-exported
//! here. `read` turns text into them, collecting every unset `${NAME}` (`env`), every
//! unknown key and every value of the wrong type instead of stopping at the first;
//! `validate` holds [`Config::validate`], the checks of the typed values, section by
//! section. [`Config::load`] and [`Config::parse`] (what `lxbridge run` uses) refuse a file
//! with any reading problem; [`Config::check`] (what `lxbridge validate` uses) reports them
//! all, with the checks' problems after them.
//!
//! Reading the file and any `mapping_file` is the only I/O here.

mod backend;
mod duration;
mod env;
mod node;
mod read;
mod rest;
mod route;
mod server;
mod validate;
mod webhook;

pub use backend::{
    Backend, BrokerConfig, EmbeddedConfig, StoreConfig, TlsFiles, Urls, MAX_PARTITIONS,
};
pub use duration::Duration;
pub use node::{
    valid_node_name, Auth, CommerceMlConfig, DeliverConfig, DeliverMode, Format, MissingRefs,
    NodeConfig, QueryEncoding,
};
pub use rest::{
    compile_requests, BodyTemplate, Expect, Rate, Request, RequestConfig, TypeRequests,
};
pub use route::{type_pattern_problem, ConflictPolicy, GroupConfig, RouteConfig};
pub use server::{AdminConfig, LogFormat, RetryConfig, ServerConfig};
pub use webhook::{WebhookAuth, WebhookChange, WebhookConfig, WebhookEntry};

use crate::transform::{Compiled, Mapping};
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// Errors loading a configuration file (not validation problems: see [`Config::validate`]).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    /// Not TOML, an unset `${NAME}`, an unknown key, a value of the wrong type: every one
    /// found.
    #[error("config file {path}:{}", listed(.problems))]
    Unreadable { path: String, problems: Vec<String> },
}

/// One problem on the line; several each on its own, indented.
fn listed(problems: &[String]) -> String {
    match problems {
        [one] => format!(" {one}"),
        many => format!("\n  {}", many.join("\n  ")),
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    #[serde(default)]
    pub server: ServerConfig,
    #[serde(default)]
    pub broker: BrokerConfig,
    #[serde(default)]
    pub store: StoreConfig,
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub retry: RetryConfig,
    #[serde(default, rename = "node")]
    pub nodes: Vec<NodeConfig>,
    #[serde(default, rename = "route")]
    pub routes: Vec<RouteConfig>,
    #[serde(default, rename = "group")]
    pub groups: Vec<GroupConfig>,
    /// Extension: the built-in backend (no RabbitMQ, no Redis), used when the config has
    /// neither `[broker]` nor `store.redis_url`.
    #[serde(default)]
    pub embedded: Option<EmbeddedConfig>,
    /// Which backend carries the changes; decided from the sections present.
    #[serde(skip)]
    pub backend: Backend,
    /// `[broker]` or `store.redis_url` was written in the config (for validate).
    #[serde(skip)]
    pub external_given: bool,
    /// The folder relative paths in the config (mapping and script files) start from.
    #[serde(skip)]
    pub base_dir: PathBuf,
}

impl Config {
    /// Reads and parses a config file, expanding `${NAME}` from the environment. Refuses it
    /// with every reading problem (see [`Config::parse`]); does not [`Config::validate`].
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: shown.clone(),
            source,
        })?;
        let mut config = Config::parse(&text, &shown)?;
        config.base_dir = folder_of(path);
        Ok(config)
    }

    /// Parses config text; `origin` names it in errors. Any problem reading it (not TOML,
    /// an unset `${NAME}`, an unknown key, a value of the wrong type) refuses it, with all
    /// of them.
    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let reading = read::read(text);
        match reading.config {
            Some(config) if reading.problems.is_empty() => Ok(config),
            _ => Err(ConfigError::Unreadable {
                path: origin.into(),
                problems: reading.problems,
            }),
        }
    }

    /// Everything `lxbridge validate` reports about a config file, one sentence each: the
    /// problems reading it met and, when its values could be read, those
    /// [`Config::validate`] finds. The config when there are none.
    pub fn check(path: &Path) -> Result<Config, Vec<String>> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| vec![format!("cannot read the file: {e}")])?;
        Config::check_text(&text, folder_of(path))
    }

    /// [`Config::check`] of text whose relative paths start from `base_dir`.
    fn check_text(text: &str, base_dir: PathBuf) -> Result<Config, Vec<String>> {
        let read::Reading {
            config,
            mut problems,
        } = read::read(text);
        let Some(mut config) = config else {
            return Err(problems);
        };
        config.base_dir = base_dir;
        problems.extend(config.validate());
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(problems)
        }
    }

    /// A route's mapping (inline or from its file); `None` when it has none.
    pub fn route_mapping(&self, route: &RouteConfig) -> Result<Option<Mapping>, String> {
        match (&route.mapping, &route.mapping_file) {
            (Some(_), Some(_)) => Err(format!(
                "{}: set mapping or mapping_file, not both",
                route.label()
            )),
            (Some(m), None) => Ok(Some(m.clone())),
            (None, Some(file)) => {
                let path = self.base_dir.join(file);
                let text = std::fs::read_to_string(&path).map_err(|e| {
                    format!(
                        "{}: cannot read mapping_file {}: {e}",
                        route.label(),
                        path.display()
                    )
                })?;
                toml::from_str(&text).map(Some).map_err(|e| {
                    format!(
                        "{}: mapping_file {} is not a valid mapping: {e}",
                        route.label(),
                        path.display()
                    )
                })
            }
            (None, None) => Ok(None),
        }
    }

    /// The route's mapping compiled for delivery (identity when it has none).
    pub fn compiled_mapping(&self, route: &RouteConfig) -> Result<Compiled, Vec<String>> {
        match self.route_mapping(route).map_err(|e| vec![e])? {
            None => Ok(Compiled::identity()),
            Some(m) => Compiled::new(&m, &self.base_dir).map_err(|problems| {
                problems
                    .into_iter()
                    .map(|p| format!("{}: mapping: {p}", route.label()))
                    .collect()
            }),
        }
    }

    /// The folder of `node`'s CommerceML sessions: its `dir`, else `<data dir>/commerceml`.
    pub fn commerceml_dir(&self, cml: &CommerceMlConfig) -> PathBuf {
        match &cml.dir {
            Some(dir) if dir.is_absolute() => dir.clone(),
            Some(dir) => self.base_dir.join(dir),
            None => self.data_dir().join("commerceml"),
        }
    }

    /// The embedded backend's folder, resolved against the config file's folder.
    pub fn data_dir(&self) -> PathBuf {
        let dir = self.embedded.clone().unwrap_or_default().data_dir;
        if dir.is_absolute() {
            dir
        } else {
            self.base_dir.join(dir)
        }
    }

    pub fn node(&self, name: &str) -> Option<&NodeConfig> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// Nodes that receive changes by push (JSON or CommerceML), in config order.
    pub fn push_targets(&self) -> impl Iterator<Item = (&NodeConfig, &DeliverConfig)> {
        self.nodes.iter().filter_map(|n| match &n.deliver {
            Some(d) if d.mode != DeliverMode::Pull => Some((n, d)),
            _ => None,
        })
    }
}

/// The folder a config file's relative paths start from.
fn folder_of(path: &Path) -> PathBuf {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// The commented example printed by `lxbridge generate-config`; a test checks it validates.
pub const EXAMPLE: &str = include_str!("../../config/lxbridge.example.toml");

/// Test help: `problems` are exactly one per needle, each needle found in one of them.
#[cfg(test)]
pub(crate) fn assert_problems(problems: &[String], needles: &[&str]) {
    let joined = problems.join("\n");
    for needle in needles {
        assert!(joined.contains(needle), "missing {needle:?} in:\n{joined}");
    }
    assert_eq!(problems.len(), needles.len(), "{joined}");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(text: &str) -> Vec<String> {
        Config::check_text(text, PathBuf::from("."))
            .err()
            .unwrap_or_default()
    }

    #[test]
    fn unknown_keys_are_errors_naming_their_path() {
        let text = "[server]\nlisten = \"127.0.0.1:1\"\nlisen = 1\n";
        let err = Config::parse(text, "t").unwrap_err().to_string();
        assert!(err.contains("unknown key server.lisen"), "{err}");
        let text = "[[node]]\nname = \"a\"\ntoken = \"t\"\n\
                    [[node]]\nname = \"b\"\ntoken = \"t\"\n\
                    deliver = { mode = \"push\", urll = \"http://h/\", auth = { basic = { user = \"u\", password = \"p\", pasword = \"q\" } } }\n";
        let err = Config::parse(text, "t").unwrap_err().to_string();
        assert!(err.contains("unknown key node[1].deliver.urll"), "{err}");
        assert!(err.contains("node[1].deliver.auth.basic.pasword"), "{err}");
    }

    #[test]
    fn env_values_are_expanded() {
        std::env::set_var("LXB_TEST_TOKEN", "from-env");
        let config = Config::parse(
            "[[node]]\nname = \"a\"\ntoken = \"x-${LXB_TEST_TOKEN}-y\"\n",
            "t",
        )
        .unwrap();
        assert_eq!(config.nodes[0].token, "x-from-env-y");
        let err = Config::parse(
            "[[node]]\nname = \"a\"\ntoken = \"${LXB_NOT_SET_ANYWHERE}\"\n",
            "t",
        )
        .unwrap_err();
        assert!(err.to_string().contains("LXB_NOT_SET_ANYWHERE"), "{err}");
    }

    #[test]
    fn log_format_and_conflict_are_named_values() {
        let config = Config::parse(
            "[server]\nlog_format = \"json\"\n[[group]]\nname = \"g\"\nnodes = []\nconflict = \"priority\"\n",
            "t",
        )
        .unwrap();
        assert_eq!(config.server.log_format, LogFormat::Json);
        assert_eq!(config.groups[0].conflict, ConflictPolicy::Priority);
        let config = Config::parse("[[group]]\nname = \"g\"\nnodes = []\n", "t").unwrap();
        assert_eq!(config.server.log_format, LogFormat::Text);
        assert_eq!(config.groups[0].conflict, ConflictPolicy::LastWriterWins);
        let problems = check(
            "[server]\nlog_format = \"xml\"\n[[group]]\nname = \"g\"\nnodes = []\nconflict = \"lww\"\n",
        );
        let joined = problems.join("\n");
        assert!(
            joined.contains("server.log_format: unknown variant `xml`, expected `text` or `json`"),
            "{joined}"
        );
        assert!(
            joined.contains(
                "group[0].conflict: unknown variant `lww`, expected `last_writer_wins` or `priority`"
            ),
            "{joined}"
        );
        // The rest of the file is still checked, with the defaults in their place.
        assert!(joined.contains("no [[node]] is configured"), "{joined}");
        assert!(
            joined.contains("nodes must list at least two nodes"),
            "{joined}"
        );
    }

    /// Before: the first unknown key or unset variable stopped reading, and with
    /// `[embedded]` beside `[broker]` the broker's URLs were not checked.
    #[test]
    fn check_reports_every_problem_of_the_file_at_once() {
        let problems = check(
            r#"
[server]
listen = "127.0.0.1:8080"
lisen = "x"
[broker]
url = ["amqp://h1/%2f", "http://h2/"]
[embedded]
data_dir = "x"
[[node]]
name = "a"
token = "${LXB_CHECK_UNSET_ONE}"
[[node]]
name = "b"
token = "${LXB_CHECK_UNSET_TWO}"
[node.deliver]
mode = "push"
url = "http://b/"
urll = "http://b/"
"#,
        );
        assert_problems(
            &problems,
            &[
                "node[0].token: environment variable LXB_CHECK_UNSET_ONE",
                "node[1].token: environment variable LXB_CHECK_UNSET_TWO",
                "unknown key server.lisen",
                "unknown key node[1].deliver.urll",
                "choose one backend",
                "broker.url \"http://h2/\" must start with amqp:// or amqps://",
            ],
        );
    }

    #[test]
    fn load_refuses_what_check_reports() {
        let text = "[server]\nlisen = 1\n[[node]]\nname = \"a\"\ntoken = \"t\"\n";
        assert!(Config::parse(text, "t").is_err());
        let err = Config::parse("[server]\nlisen = 1\nlog_format = 5\n", "t")
            .unwrap_err()
            .to_string();
        assert!(err.contains("\n  unknown key server.lisen"), "{err}");
        assert!(err.contains("\n  server.log_format: invalid type"), "{err}");
    }

    #[test]
    fn a_table_dropped_for_a_missing_value_leaves_the_checks_out() {
        // `mode` is required: the node's deliver table can't be read, and checking the rest
        // without it would only add problems that are not there.
        let problems = check(
            "[[node]]\nname = \"a\"\ntoken = 5\n[[node]]\nname = \"b\"\ntoken = \"t\"\n[node.deliver]\nurl = \"x\"\nmod = \"push\"\n",
        );
        assert_eq!(
            problems,
            [
                "unknown key node[1].deliver.mod (misspelt, or in the wrong section?)",
                "node[0].token: invalid type: integer `5`, expected a string",
                "node[1].deliver: missing field `mode`",
            ],
        );
    }

    #[test]
    fn not_toml_is_one_problem() {
        let problems = check("[server\n");
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].starts_with("not valid TOML"), "{problems:?}");
    }

    #[test]
    fn a_mapping_key_it_does_not_know_is_named_and_the_rest_still_checked() {
        // Mappings refuse unknown keys themselves (deny_unknown_fields in transform).
        let problems = check(
            "[[node]]\nname = \"a\"\ntoken = \"t\"\n[[route]]\nfrom = \"a\"\nto = [\"x\"]\n\
             [route.mapping.types.\"Document.X\"]\nkep = [\"a\"]\n",
        );
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(
            problems[0].starts_with(
                "route[0].mapping.types.\"Document.X\".kep: unknown field `kep`, expected one of"
            ),
            "{problems:?}"
        );
        assert_eq!(problems[1], "route[0]: to \"x\" is not a configured node");
    }

    #[test]
    fn wrong_values_in_a_list_are_named_by_their_place_in_the_file() {
        let problems = check(
            "[retry]\ndelays = [\"1s\", \"5x\", \"7y\"]\n[[node]]\nname = \"a\"\ntoken = \"t\"\n",
        );
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(
            problems[0].starts_with("retry.delays[1]: duration \"5x\""),
            "{problems:?}"
        );
        assert!(
            problems[1].starts_with("retry.delays[2]: duration \"7y\""),
            "{problems:?}"
        );
    }
}
