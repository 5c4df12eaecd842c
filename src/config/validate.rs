//! [`Config::validate`]: the problems of a typed config, one sentence each, section by
//! section: server, backend (and how RabbitMQ and Redis are reached), retry, nodes, routes,
//! groups. The problems met reading the file (unknown keys, unset `${NAME}`s) are
//! [`Config::check`]'s.

use super::{
    type_pattern_problem, valid_node_name, CommerceMlConfig, Config, DeliverConfig, DeliverMode,
    Format, GroupConfig, RouteConfig, TlsFiles, MAX_PARTITIONS,
};
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;

type Problems = Vec<String>;

impl Config {
    /// Every problem in the configuration, one sentence each; empty when it is usable.
    pub fn validate(&self) -> Vec<String> {
        let mut problems = Vec::new();
        self.server_problems(&mut problems);
        self.backend_problems(&mut problems);
        self.retry_problems(&mut problems);
        self.node_problems(&mut problems);
        self.route_problems(&mut problems);
        self.group_problems(&mut problems);
        problems
    }

    fn server_problems(&self, problems: &mut Problems) {
        if self.server.listen.parse::<SocketAddr>().is_err() {
            problems.push(format!(
                "server.listen {:?} is not an address like \"127.0.0.1:8080\"",
                self.server.listen
            ));
        }
        if self.server.max_body_bytes == 0 {
            problems.push("server.max_body_bytes must be greater than 0".into());
        }
    }

    /// `[embedded]` or `[broker]` + `[store]`: one of them, and what each needs. With both,
    /// both are checked.
    fn backend_problems(&self, problems: &mut Problems) {
        if self.external_given && self.embedded.is_some() {
            problems.push(
                "[embedded] and [broker]/store.redis_url are both set: choose one backend (embedded, or RabbitMQ + Redis)"
                    .into(),
            );
        }
        if let Some(embedded) = &self.embedded {
            if embedded.data_dir.as_os_str().is_empty() {
                problems.push("embedded.data_dir must not be empty".into());
            }
        }
        if self.external_given {
            self.broker_connection_problems(problems);
            self.store_connection_problems(problems);
        }
        let prefix = &self.broker.prefix;
        if prefix.is_empty()
            || prefix.len() > 64
            || !prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
        {
            problems.push(format!(
                "broker.prefix {prefix:?} must be 1-64 characters of a-z, A-Z, 0-9, _, - or ."
            ));
        }
        if !(1..=MAX_PARTITIONS).contains(&self.broker.partitions) {
            problems.push(format!(
                "broker.partitions {} must be 1-{MAX_PARTITIONS}",
                self.broker.partitions
            ));
        }
        let sites = self.nodes.iter().filter(|n| {
            n.deliver
                .as_ref()
                .is_some_and(|d| d.mode == DeliverMode::Commerceml)
        });
        for site in sites.filter(|_| self.broker.partitions > 1) {
            problems.push(format!(
                "node {:?} deliver: mode \"commerceml\" needs broker.partitions = 1 (a site takes one exchange at a time; partitions would let several instances exchange with it side by side)",
                site.name
            ));
        }
        if self.store.history_max == 0 {
            problems.push("store.history_max must be at least 1".into());
        }
    }

    /// How RabbitMQ is reached: its URLs and TLS files.
    fn broker_connection_problems(&self, problems: &mut Problems) {
        let broker = &self.broker;
        if broker.url.0.is_empty() {
            problems.push("broker.url lists no URL".into());
        }
        let tls_urls = schemes("broker.url", &broker.url.0, "amqp", problems);
        self.tls_files("broker.tls", broker.tls.as_ref(), tls_urls, problems);
        if broker.quorum_replicas == Some(0) {
            problems.push("broker.quorum_replicas must be at least 1".into());
        }
    }

    /// How Redis is reached: its URL, the sentinels and TLS files.
    fn store_connection_problems(&self, problems: &mut Problems) {
        let store = &self.store;
        let urls = std::slice::from_ref(&store.redis_url);
        let tls_urls = schemes("store.redis_url", urls, "redis", problems);
        schemes("store.sentinels", &store.sentinels, "redis", problems);
        self.tls_files("store.tls", store.tls.as_ref(), tls_urls, problems);
        match (store.sentinels.is_empty(), &store.master_name) {
            (true, Some(_)) => {
                problems.push("store.master_name is set but store.sentinels is empty".into())
            }
            (false, None) => problems.push(
                "store.sentinels needs store.master_name (the name the sentinels monitor)".into(),
            ),
            _ => {}
        }
    }

    /// Checks a `tls = { … }` table: its files, and that some URL uses TLS.
    fn tls_files(
        &self,
        at: &str,
        files: Option<&TlsFiles>,
        tls_urls: bool,
        problems: &mut Problems,
    ) {
        let Some(files) = files else { return };
        if !tls_urls {
            problems.push(format!(
                "{at} is set but no URL of its section uses TLS (amqps:// or rediss://): lxbridge would connect in plain text"
            ));
        }
        if let Err(found) = crate::tls::Material::load(files, &self.base_dir, at) {
            problems.extend(found);
        }
    }

    fn retry_problems(&self, problems: &mut Problems) {
        if self.retry.delays.is_empty() {
            problems.push("retry.delays must list at least one delay".into());
        }
        if self.retry.delays.len() > 50 {
            problems.push("retry.delays may list at most 50 delays".into());
        }
    }

    fn node_problems(&self, problems: &mut Problems) {
        if self.nodes.is_empty() {
            problems.push("no [[node]] is configured".into());
        }
        let mut seen = HashSet::new();
        for (i, node) in self.nodes.iter().enumerate() {
            if !valid_node_name(&node.name) {
                problems.push(format!(
                    "node[{i}].name {:?} must match [a-z0-9_-]{{1,64}}",
                    node.name
                ));
            }
            if !seen.insert(node.name.as_str()) {
                problems.push(format!("node name {:?} is used twice", node.name));
            }
            if node.token.is_empty() {
                problems.push(format!("node {:?} has an empty token", node.name));
            }
            if let Some(deliver) = &node.deliver {
                let at = format!("node {:?} deliver", node.name);
                deliver_problems(&at, deliver, problems);
            }
            if let Some(webhook) = &node.webhook {
                problems.extend(webhook.problems(&format!("node {:?} webhook", node.name)));
            }
            if let Some(cml) = &node.commerceml {
                let at = format!("node {:?} commerceml", node.name);
                commerceml_problems(&at, cml, problems);
                if node
                    .deliver
                    .as_ref()
                    .is_some_and(|d| d.format == Format::Xdto)
                {
                    problems.push(format!(
                        "{at}: mode=query writes the orders as CommerceML; format = \"1c-xdto\" in [node.deliver] cannot be served"
                    ));
                }
            }
        }
    }

    fn route_problems(&self, problems: &mut Problems) {
        let mut names = HashSet::new();
        for (i, route) in self.routes.iter().enumerate() {
            let at = match &route.name {
                Some(name) => format!("route {name:?}"),
                None => format!("route[{i}]"),
            };
            if let Some(name) = &route.name {
                if !names.insert(name.as_str()) {
                    problems.push(format!("route name {name:?} is used twice"));
                }
            }
            self.route_end_problems(&at, route, problems);
            pattern_problems(&at, &route.types, problems);
            if let Err(mapping_problems) = self.compiled_mapping(route) {
                problems.extend(mapping_problems);
            }
        }
    }

    /// A route's `from` and `to`: configured nodes, the targets able to receive.
    fn route_end_problems(&self, at: &str, route: &RouteConfig, problems: &mut Problems) {
        if self.node(&route.from).is_none() {
            problems.push(format!(
                "{at}: from {:?} is not a configured node",
                route.from
            ));
        }
        if route.to.is_empty() {
            problems.push(format!("{at}: to lists no target"));
        }
        for target in &route.to {
            match self.node(target) {
                None => problems.push(format!("{at}: to {target:?} is not a configured node")),
                Some(n) if n.deliver.is_none() => problems.push(format!(
                    "{at}: target {target:?} has no [node.deliver] section, so nothing can be delivered to it"
                )),
                Some(_) if *target == route.from => {
                    problems.push(format!("{at}: routes node {target:?} to itself"))
                }
                Some(_) => {}
            }
        }
    }

    fn group_problems(&self, problems: &mut Problems) {
        let mut group_of: HashMap<&str, &str> = HashMap::new();
        let mut names = HashSet::new();
        for (i, group) in self.groups.iter().enumerate() {
            let at = format!("group {:?}", group.name);
            if !valid_node_name(&group.name) {
                problems.push(format!(
                    "group[{i}].name {:?} must be 1-64 characters of a-z, 0-9, _ or -",
                    group.name
                ));
            }
            if !names.insert(group.name.as_str()) {
                problems.push(format!("{at}: the name is used twice"));
            }
            if group.nodes.len() < 2 {
                problems.push(format!("{at}: nodes must list at least two nodes"));
            }
            self.member_problems(&at, group, &mut group_of, problems);
            if group.types.is_empty() {
                problems.push(format!(
                    "{at}: types must not be empty (leave it out for all types)"
                ));
            }
            pattern_problems(&at, &group.types, problems);
            if group.max_hops == 0 {
                problems.push(format!("{at}: max_hops must be at least 1"));
            }
        }
    }

    /// A group's members: configured, receiving, listed once, in no other group
    /// (`group_of`: the group of each member seen so far).
    fn member_problems<'a>(
        &'a self,
        at: &str,
        group: &'a GroupConfig,
        group_of: &mut HashMap<&'a str, &'a str>,
        problems: &mut Problems,
    ) {
        let mut seen = HashSet::new();
        for member in &group.nodes {
            if !seen.insert(member.as_str()) {
                problems.push(format!("{at}: node {member:?} is listed twice"));
                continue;
            }
            match self.node(member) {
                None => problems.push(format!("{at}: unknown node {member:?}")),
                Some(n) if n.deliver.is_none() => problems.push(format!(
                    "{at}: node {member:?} has no [node.deliver]: a member receives the others' changes"
                )),
                Some(_) => {}
            }
            if let Some(other) = group_of.insert(member.as_str(), group.name.as_str()) {
                problems.push(format!(
                    "{at}: node {member:?} is already a member of group {other:?} (a node is in one group at most)"
                ));
            }
        }
    }
}

/// A `[node.deliver]` section (`at` names it): a push URL, and its limits.
fn deliver_problems(at: &str, deliver: &DeliverConfig, problems: &mut Problems) {
    let mode = match deliver.mode {
        DeliverMode::Push => "push",
        DeliverMode::Commerceml => "commerceml",
        DeliverMode::Pull => "pull",
        DeliverMode::Http => "http",
    };
    match (deliver.mode, &deliver.url) {
        (DeliverMode::Pull, _) => {}
        (_, None) => problems.push(format!("{at}: mode \"{mode}\" needs a url")),
        (_, Some(url)) => {
            if reqwest::Url::parse(url)
                .map(|u| !matches!(u.scheme(), "http" | "https") || !u.has_host())
                .unwrap_or(true)
            {
                problems.push(format!(
                    "{at}: url {url:?} is not an http:// or https:// URL"
                ));
            }
        }
    }
    if deliver.mode == DeliverMode::Commerceml {
        site_problems(at, deliver, problems);
    } else if deliver.orders.is_some() {
        problems.push(format!("{at}: orders is for mode \"commerceml\" only"));
    }
    rest_problems(at, deliver, problems);
    if deliver.batch_max == 0 || deliver.batch_max > 10_000 {
        problems.push(format!("{at}: batch_max must be between 1 and 10000"));
    }
    if deliver.concurrency == 0 || deliver.concurrency > 256 {
        problems.push(format!("{at}: concurrency must be between 1 and 256"));
    }
    if deliver.timeout.0.is_zero() {
        problems.push(format!("{at}: timeout must be greater than 0"));
    }
}

/// The keys of a `mode = "http"` delivery, and none of them elsewhere.
fn rest_problems(at: &str, deliver: &DeliverConfig, problems: &mut Problems) {
    if deliver.mode != DeliverMode::Http {
        if deliver.rate.is_some() || !deliver.requests.is_empty() {
            problems.push(format!(
                "{at}: rate and requests are for mode \"http\" only"
            ));
        }
        return;
    }
    if let Err(p) = super::compile_requests(at, &deliver.requests) {
        problems.extend(p);
    }
    if deliver.format == Format::Xdto {
        problems.push(format!(
            "{at}: mode \"http\" sends the requests' bodies; format = \"1c-xdto\" does not apply (use {{data}} of the mapping)"
        ));
    }
}

/// The keys of a `mode = "commerceml"` delivery.
fn site_problems(at: &str, deliver: &DeliverConfig, problems: &mut Problems) {
    if deliver
        .orders
        .is_some_and(|o| o.0 < std::time::Duration::from_secs(1))
    {
        problems.push(format!("{at}: orders must be at least 1s"));
    }
    if deliver.import_rounds == 0 || deliver.import_time.0.is_zero() {
        problems.push(format!(
            "{at}: import_rounds and import_time must be greater than 0"
        ));
    }
    for (key, id) in [
        ("catalog_id", &deliver.catalog_id),
        ("classifier_id", &deliver.classifier_id),
    ] {
        if id.trim().is_empty() {
            problems.push(format!("{at}: {key} must not be empty"));
        }
    }
    if deliver.format == Format::Xdto {
        problems.push(format!(
            "{at}: mode \"commerceml\" writes CommerceML; format = \"1c-xdto\" cannot be sent"
        ));
    }
}

fn commerceml_problems(at: &str, cml: &CommerceMlConfig, problems: &mut Problems) {
    if !(1024..=256 * 1024 * 1024).contains(&cml.file_limit) {
        problems.push(format!(
            "{at}: file_limit must be between 1024 and 268435456 bytes"
        ));
    }
    if cml.session_limit < cml.file_limit as u64 {
        problems.push(format!("{at}: session_limit must be at least file_limit"));
    }
    if cml.import_wait.0.is_zero() || cml.import_wait.0 > std::time::Duration::from_secs(60) {
        problems.push(format!(
            "{at}: import_wait must be between 1ms and 60s (1C waits for each answer)"
        ));
    }
    if cml.dir.as_ref().is_some_and(|d| d.as_os_str().is_empty()) {
        problems.push(format!("{at}: dir must not be empty"));
    }
}

/// The `types` patterns of a route or group (`at` names it).
fn pattern_problems(at: &str, patterns: &[String], problems: &mut Problems) {
    for pattern in patterns {
        if let Some(why) = type_pattern_problem(pattern) {
            problems.push(format!("{at}: types pattern {pattern:?} {why}"));
        }
    }
}

/// Checks that every URL of `at` is `<plain>://` or its TLS form (`<plain>s://`), and not a
/// mix of both; true when they use TLS.
fn schemes(at: &str, urls: &[String], plain: &str, problems: &mut Problems) -> bool {
    let tls = format!("{plain}s");
    let mut kinds = HashSet::new();
    for url in urls {
        match reqwest::Url::parse(url) {
            Ok(u) if u.scheme() == plain || u.scheme() == tls => {
                kinds.insert(u.scheme() == tls);
                if u.host_str().is_none_or(str::is_empty) {
                    problems.push(format!("{at} {url:?} names no host"));
                }
            }
            Ok(u) => problems.push(format!(
                "{at} {url:?} must start with {plain}:// or {tls}:// (not {}://)",
                u.scheme()
            )),
            Err(e) => problems.push(format!("{at} {url:?} is not a URL: {e}")),
        }
    }
    if kinds.len() > 1 {
        problems.push(format!(
            "{at} mixes {plain}:// and {tls}:// URLs: every node is reached the same way (no plain-text fallback)"
        ));
    }
    kinds.contains(&true)
}

#[cfg(test)]
mod tests {
    use super::super::{assert_problems, EXAMPLE};
    use super::*;

    #[test]
    fn example_config_validates() {
        let config = Config::parse(EXAMPLE, "example").expect("example parses");
        assert_eq!(config.validate(), Vec::<String>::new());
        assert!(config.push_targets().count() >= 1);
    }

    fn with_connections(broker: &str, store: &str) -> Vec<String> {
        let text = format!(
            "[broker]\n{broker}\n[store]\n{store}\n[[node]]\nname = \"a\"\ntoken = \"t\"\n"
        );
        problems_of(&text)
    }

    #[test]
    fn broker_url_is_one_url_or_a_list_of_one_scheme() {
        let list = r#"url = ["amqp://h1:5672/%2f", "amqp://h2:5672/%2f"]"#;
        assert_eq!(with_connections(list, ""), Vec::<String>::new());
        let config = Config::parse(&format!("[broker]\n{list}\n"), "t").unwrap();
        assert_eq!(config.broker.url.0.len(), 2);
        let mixed = with_connections(r#"url = ["amqp://h1/%2f", "amqps://h2/%2f"]"#, "");
        assert!(
            mixed
                .iter()
                .any(|p| p.contains("mixes amqp:// and amqps://")),
            "{mixed:?}"
        );
        let empty = with_connections("url = []", "");
        assert!(
            empty.iter().any(|p| p.contains("lists no URL")),
            "{empty:?}"
        );
        let http = with_connections(r#"url = "http://h1/""#, "");
        assert!(
            http.iter()
                .any(|p| p.contains("must start with amqp:// or amqps://")),
            "{http:?}"
        );
        let number = Config::parse("[broker]\nurl = 5\n", "t").unwrap_err();
        assert!(
            number.to_string().contains("a URL or a list of URLs"),
            "{number}"
        );
    }

    #[test]
    fn tls_without_a_tls_url_and_sentinels_without_a_name_are_refused() {
        let plain = with_connections(
            "url = \"amqp://h/%2f\"\ntls = { ca_file = \"/nonexistent/ca.pem\" }",
            "",
        );
        assert!(
            plain
                .iter()
                .any(|p| p.contains("would connect in plain text")),
            "{plain:?}"
        );
        assert!(
            plain
                .iter()
                .any(|p| p.contains("broker.tls.ca_file /nonexistent/ca.pem")),
            "{plain:?}"
        );
        let sentinel = with_connections("", r#"sentinels = ["redis://s1:26379"]"#);
        assert!(
            sentinel
                .iter()
                .any(|p| p.contains("needs store.master_name")),
            "{sentinel:?}"
        );
        let name = with_connections("", r#"master_name = "m""#);
        assert!(
            name.iter().any(|p| p.contains("store.sentinels is empty")),
            "{name:?}"
        );
        let rediss = with_connections("", r#"redis_url = "rediss://r:6380/0""#);
        assert_eq!(rediss, Vec::<String>::new());
        let zero = with_connections("quorum_replicas = 0", "");
        assert!(
            zero.iter().any(|p| p.contains("quorum_replicas")),
            "{zero:?}"
        );
    }

    #[test]
    fn both_backends_are_refused_and_both_still_checked() {
        let both = Config::parse(
            "[broker]\nurl = \"http://h/\"\n[store]\nredis_url = \"redis://\"\n[embedded]\ndata_dir = \"\"\n[[node]]\nname = \"a\"\ntoken = \"t\"\n",
            "t",
        )
        .unwrap()
        .validate();
        assert_problems(
            &both,
            &[
                "choose one backend",
                "embedded.data_dir must not be empty",
                "broker.url \"http://h/\" must start with amqp://",
                "store.redis_url \"redis://\" names no host",
            ],
        );
    }

    /// The problems `validate` finds in a config that parses.
    fn problems_of(toml: &str) -> Vec<String> {
        Config::parse(toml, "t").expect("parses").validate()
    }

    #[test]
    fn validate_reports_every_problem() {
        let problems = problems_of(
            r#"
[[node]]
name = "a"
token = "t"
[[node]]
name = "a"
token = "t"
[[node]]
name = "Shop"
token = "t"
[node.deliver]
mode = "push"
[[route]]
from = "a"
to = ["nowhere"]
types = ["Catalog.Prod*"]
"#,
        );
        assert_problems(
            &problems,
            &[
                "used twice",
                "\"Shop\" must match",
                "needs a url",
                "\"nowhere\" is not a configured node",
                "Prod*",
            ],
        );
    }

    #[test]
    fn commerceml_limits_are_checked() {
        let problems = problems_of(
            r#"
[[node]]
name = "ut"
token = "t"
deliver = { mode = "pull", format = "1c-xdto" }
[node.commerceml]
file_limit = 100
session_limit = 50
import_wait = "61s"
dir = ""
"#,
        );
        assert_problems(
            &problems,
            &[
                "file_limit must be between 1024",
                "session_limit must be at least file_limit",
                "import_wait must be between 1ms and 60s",
                "dir must not be empty",
                "format = \"1c-xdto\" in [node.deliver] cannot be served",
            ],
        );
    }

    #[test]
    fn a_site_needs_one_partition() {
        let site = "[[node]]\nname = \"shop\"\ntoken = \"t\"\ndeliver = { mode = \"commerceml\", url = \"http://h/1c_exchange.php\" }\n";
        let with = |partitions: u16| {
            problems_of(&format!(
                "[broker]\nurl = \"amqp://h/%2f\"\npartitions = {partitions}\n[store]\nredis_url = \"redis://h/\"\n{site}"
            ))
        };
        assert_eq!(with(1), Vec::<String>::new());
        assert_problems(
            &with(4),
            &["\"shop\" deliver: mode \"commerceml\" needs broker.partitions = 1"],
        );
    }

    #[test]
    fn groups_are_checked_member_by_member() {
        let problems = problems_of(
            r#"
[[node]]
name = "a"
token = "t"
deliver = { mode = "pull" }
[[node]]
name = "b"
token = "t"
[[group]]
name = "g"
nodes = ["a", "b", "a", "c"]
types = ["Catalog..X"]
max_hops = 0
[[group]]
name = "g"
nodes = ["a"]
"#,
        );
        assert_problems(
            &problems,
            &[
                "group \"g\": node \"b\" has no [node.deliver]",
                "group \"g\": node \"a\" is listed twice",
                "group \"g\": unknown node \"c\"",
                "types pattern \"Catalog..X\"",
                "max_hops must be at least 1",
                "group \"g\": the name is used twice",
                "nodes must list at least two nodes",
                "node \"a\" is already a member of group \"g\"",
            ],
        );
    }
}
