//! `[[route]]` (which changes go from a node to which targets, and how they are reshaped)
//! and `[[group]]` (parallel copies of the same objects), with their type patterns.

use crate::transform::Mapping;
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
pub struct RouteConfig {
    pub name: Option<String>,
    pub from: String,
    pub to: Vec<String>,
    #[serde(default = "default_types")]
    pub types: Vec<String>,
    /// How changes are reshaped for the targets of this route (inline).
    pub mapping: Option<Mapping>,
    /// The same, from a TOML file (relative to the config file's folder).
    pub mapping_file: Option<String>,
}

impl RouteConfig {
    /// The route's name for messages: its `name`, else `from -> to`.
    pub fn label(&self) -> String {
        match &self.name {
            Some(name) => format!("route {name:?}"),
            None => format!("route {} -> {}", self.from, self.to.join(",")),
        }
    }
}

fn default_types() -> Vec<String> {
    vec!["*".into()]
}

#[derive(Debug, Clone, Deserialize)]
pub struct GroupConfig {
    pub name: String,
    pub nodes: Vec<String>,
    #[serde(default = "default_types")]
    pub types: Vec<String>,
    #[serde(default)]
    pub conflict: ConflictPolicy,
    /// Extension: lxbridge hops a change may make through members that rewrite what they
    /// receive and send it back, before it is dropped as a loop.
    #[serde(default = "default_max_hops")]
    pub max_hops: u32,
}

/// `group.conflict`: how a group decides between two versions of an object written at the
/// same time (see [`crate::group`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConflictPolicy {
    /// The later change wins; at the same time, the member listed first.
    #[default]
    LastWriterWins,
    /// The member listed first wins.
    Priority,
}

fn default_max_hops() -> u32 {
    10
}

/// A route's type pattern: dot-separated words, each either literal, `*` (one word) or `#`
/// (zero or more words). A pattern that is exactly `*` means every type. These are RabbitMQ
/// topic patterns, so routing happens in the broker exactly as [`crate::route`] computes it.
pub fn type_pattern_problem(pattern: &str) -> Option<String> {
    if pattern.is_empty() {
        return Some("is empty".into());
    }
    for word in pattern.split('.') {
        if word.is_empty() {
            return Some("has an empty word (two dots in a row, or a leading/trailing dot)".into());
        }
        if word.len() > 1 && (word.contains('*') || word.contains('#')) {
            return Some(format!(
                "uses a wildcard inside the word {word:?}; `*` and `#` must stand for a whole \
                 dot-separated word, like \"Catalog.*\""
            ));
        }
        if word.chars().any(char::is_whitespace) {
            return Some("contains whitespace".into());
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_patterns() {
        assert!(type_pattern_problem("Catalog.*").is_none());
        assert!(type_pattern_problem("Справочник.Номенклатура").is_none());
        assert!(type_pattern_problem("#").is_none());
        assert!(type_pattern_problem("Catalog.Pr*").is_some());
        assert!(type_pattern_problem("Catalog..X").is_some());
    }
}
