//! The service's own sections: `[server]` (listening, limits, logs), `[admin]` and `[retry]`.

use super::Duration;
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct ServerConfig {
    pub listen: String,
    pub max_body_bytes: usize,
    pub dedupe_window: Duration,
    /// Extension: how long SIGTERM waits for in-flight requests and deliveries.
    pub shutdown_grace: Duration,
    /// Extension: how log lines on stderr are written.
    pub log_format: LogFormat,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: "127.0.0.1:8080".into(),
            max_body_bytes: 32 * 1024 * 1024,
            dedupe_window: Duration::from_secs(24 * 3600),
            shutdown_grace: Duration::from_secs(30),
            log_format: LogFormat::Text,
        }
    }
}

/// `server.log_format`: `"text"` or `"json"`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines (the default).
    #[default]
    Text,
    /// One JSON object a line, for log collectors.
    Json,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct AdminConfig {
    /// Bearer token for the admin API; with none set the admin API answers 401.
    pub token: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct RetryConfig {
    pub delays: Vec<Duration>,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            delays: ["1s", "10s", "1m", "10m", "1h"]
                .iter()
                .map(|d| d.parse().expect("built-in delays parse"))
                .collect(),
        }
    }
}
