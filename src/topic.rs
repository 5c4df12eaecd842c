//! Type patterns as RabbitMQ's topic exchanges match them (a change's type is the routing
//! key): `*` is exactly one word, `#` zero or more. Routes and groups both match types with
//! these, and the broker binds with the same patterns, so lxbridge and RabbitMQ agree.

/// Turns a route pattern into the topic pattern the broker uses (a lone `*` means every type).
pub fn topic_pattern(pattern: &str) -> String {
    if pattern == "*" {
        "#".to_string()
    } else {
        pattern.to_string()
    }
}

/// RabbitMQ topic matching: `*` is exactly one word, `#` zero or more.
pub fn topic_matches(pattern: &str, key: &str) -> bool {
    fn go(p: &[&str], k: &[&str]) -> bool {
        match (p.first(), k.first()) {
            (None, None) => true,
            (Some(&"#"), _) => go(&p[1..], k) || (!k.is_empty() && go(p, &k[1..])),
            (Some(&"*"), Some(_)) => go(&p[1..], &k[1..]),
            (Some(w), Some(kw)) => w == kw && go(&p[1..], &k[1..]),
            _ => false,
        }
    }
    let p: Vec<&str> = pattern.split('.').collect();
    let k: Vec<&str> = key.split('.').collect();
    go(&p, &k)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_matching_table() {
        let cases = [
            ("Catalog.*", "Catalog.Products", true),
            ("Catalog.*", "Catalog.Номенклатура", true),
            ("Catalog.*", "Document.Order", false),
            ("Catalog.*", "Catalog", false),
            ("Catalog.*", "Catalog.A.B", false),
            ("#", "Anything.At.All", true),
            ("#", "X", true),
            ("Document.Order", "Document.Order", true),
            ("Document.Order", "Document.Orders", false),
            ("*.Order", "Document.Order", true),
            ("Catalog.#", "Catalog", true),
            ("Catalog.#", "Catalog.A.B", true),
            (
                "InformationRegister.*",
                "InformationRegister.ЦеныНоменклатуры",
                true,
            ),
        ];
        for (pattern, key, want) in cases {
            assert_eq!(topic_matches(pattern, key), want, "{pattern} vs {key}");
        }
    }
}
