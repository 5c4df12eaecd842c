//! Routing, pure: which targets a change of a given type from a given source goes to.
//!
//! Route `types` are RabbitMQ topic patterns over the type (`Catalog.*`, `Document.Order`,
//! `#`); the lone pattern `*` means every type. The broker routes with the very same
//! patterns as bindings ([`Routes::bindings`]); this module answers the same question
//! in-process so ingress can reject a change no route takes before publishing it.

use crate::config::Config;
use crate::group::Group;
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

pub use crate::topic::{topic_matches, topic_pattern};

/// One binding: changes from `source` whose type matches `pattern` go to `target`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Binding {
    pub source: String,
    pub target: String,
    /// The RabbitMQ topic pattern.
    pub pattern: String,
}

#[derive(Debug, Default, Clone)]
pub struct Routes {
    by_source: HashMap<String, Vec<Binding>>,
    /// `[[group]]`s, by member.
    groups: HashMap<String, Arc<Group>>,
}

/// The partition of a target's delivery queue that an object's changes go to: a stable hash
/// of its ref (FNV-1a, then the SplitMix64 finaliser, since FNV-1a's low bits depend only on
/// the low bits of each byte), so every instance and every restart agrees.
pub fn partition(reference: &str, partitions: u16) -> u16 {
    let mut x = crate::group::fnv1a(reference.as_bytes());
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^= x >> 31;
    (x % u64::from(partitions.max(1))) as u16
}

impl Routes {
    pub fn from_config(config: &Config) -> Routes {
        let mut set = BTreeSet::new();
        for route in &config.routes {
            for target in &route.to {
                for pattern in &route.types {
                    set.insert(Binding {
                        source: route.from.clone(),
                        target: target.clone(),
                        pattern: topic_pattern(pattern),
                    });
                }
            }
        }
        // A group routes every member's changes of its types to every other member.
        let mut groups = HashMap::new();
        for g in &config.groups {
            let group = Arc::new(Group {
                name: g.name.clone(),
                members: g.nodes.clone(),
                patterns: g.types.iter().map(|p| topic_pattern(p)).collect(),
                policy: g.conflict,
                max_hops: g.max_hops,
            });
            for member in &g.nodes {
                for other in g.nodes.iter().filter(|o| *o != member) {
                    for pattern in &group.patterns {
                        set.insert(Binding {
                            source: member.clone(),
                            target: other.clone(),
                            pattern: pattern.clone(),
                        });
                    }
                }
                groups.insert(member.clone(), group.clone());
            }
        }
        let mut by_source: HashMap<String, Vec<Binding>> = HashMap::new();
        for binding in set {
            by_source
                .entry(binding.source.clone())
                .or_default()
                .push(binding);
        }
        Routes { by_source, groups }
    }

    /// The group a change of `kind` from `node` belongs to: `node` is a member and the
    /// group takes the type.
    pub fn group(&self, node: &str, kind: &str) -> Option<&Arc<Group>> {
        self.groups.get(node).filter(|g| g.takes(node, kind))
    }

    /// The group `node` is a member of.
    pub fn group_of(&self, node: &str) -> Option<&Arc<Group>> {
        self.groups.get(node)
    }

    /// The group by name.
    pub fn group_named(&self, name: &str) -> Option<&Arc<Group>> {
        self.groups.values().find(|g| g.name == name)
    }

    /// Targets for a change of `kind` from `source`, each once, in name order.
    pub fn targets(&self, source: &str, kind: &str) -> Vec<&str> {
        let mut out: Vec<&str> = Vec::new();
        if let Some(bindings) = self.by_source.get(source) {
            for b in bindings {
                if !out.contains(&b.target.as_str()) && topic_matches(&b.pattern, kind) {
                    out.push(&b.target);
                }
            }
        }
        out.sort_unstable();
        out
    }

    /// Every binding, for declaring the topology.
    pub fn bindings(&self) -> impl Iterator<Item = &Binding> {
        self.by_source.values().flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_follow_routes() {
        let config = Config::parse(
            r#"
[[node]]
name = "central"
token = "t"
[[node]]
name = "shop"
token = "t"
deliver = { mode = "push", url = "http://127.0.0.1:1/" }
[[node]]
name = "erp"
token = "t"
deliver = { mode = "push", url = "http://127.0.0.1:1/" }
[[route]]
from = "central"
to = ["shop", "erp"]
types = ["Catalog.*"]
[[route]]
from = "central"
to = ["erp"]
[[route]]
from = "shop"
to = ["central"]
types = ["Document.Order"]
"#,
            "t",
        )
        .unwrap();
        let routes = Routes::from_config(&config);
        assert_eq!(
            routes.targets("central", "Catalog.Products"),
            vec!["erp", "shop"]
        );
        assert_eq!(routes.targets("central", "Document.Order"), vec!["erp"]);
        assert_eq!(routes.targets("shop", "Document.Order"), vec!["central"]);
        assert!(routes.targets("shop", "Catalog.Products").is_empty());
        assert!(routes.targets("erp", "Catalog.Products").is_empty());
        // the lone "*" (the default) becomes the all-matching topic pattern
        assert!(routes
            .bindings()
            .any(|b| b.target == "erp" && b.pattern == "#"));
    }

    #[test]
    fn partition_is_stable_and_in_range() {
        assert_eq!(partition("anything", 1), 0);
        let refs: Vec<String> = (0..400).map(|i| format!("obj-{i}")).collect();
        let mut counts = [0usize; 4];
        for r in &refs {
            let p = partition(r, 4);
            assert_eq!(p, partition(r, 4));
            counts[usize::from(p)] += 1;
        }
        // A hash that spreads: every partition gets a fair share of 400 refs.
        assert!(
            counts.iter().all(|&c| (60..=140).contains(&c)),
            "{counts:?}"
        );
        // Fixed forever: the value is where an object's changes already wait.
        assert_eq!(partition("5f1c0000-0000-0000-0000-000000000001", 4), 3);
        assert_eq!(partition("obj-7", 8), 4);
    }
}
