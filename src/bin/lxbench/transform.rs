//! `--transform`: the transform cost per change, beside the end-to-end budget (no broker
//! needed).

use crate::{round3, Args};
use serde_json::{json, Value};
use std::time::Instant;

/// A 10-rule mapping for the 1C customer order fixture.
const TEN_RULES: &str = r#"
[types."Document.ЗаказКлиента"]
rename = "Document.Order"
filter = [{ field = "Posted", eq = true }]
drop = ["Комментарий", "Товары[].СтавкаНДС"]
fields = { "Number" = "number", "Date" = "date", "Товары[].Номенклатура" = "Товары[].product" }
set = { "origin" = "1c" }
values = { "Статус" = { "КОтгрузке" = "ready" } }
defaults = { "Склад" = "" }
refs = { "Контрагент" = "Catalog.Контрагенты" }
"#;

const SCRIPT: &str = r#"
[types."*"]
[types."Document.ЗаказКлиента"]
rename = "Document.Order"
"#;

/// Transform cost per change on the ~1 KB 1C order: parse the data (as delivery does),
/// apply the mapping, serialise the result.
pub(crate) fn transform_bench(args: &Args) {
    use lxbridge::transform::{Change, Compiled, Mapping, Outcome, Remap};
    let order: Value = serde_json::from_str(include_str!(
        "../../../tests/fixtures/1c/document-order.json"
    ))
    .expect("fixture");
    let parsed = lxbridge::model::parse_change(order).expect("fixture parses");
    let raw = serde_json::to_string(parsed.data.as_ref().expect("upsert")).expect("data");
    let change = |data: Value| Change {
        id: "bench".into(),
        kind: parsed.kind.clone(),
        reference: parsed.reference.clone(),
        op: parsed.op,
        data: Some(data),
        source: "central".into(),
        seq: 1,
    };
    let mut script_mapping: Mapping = toml::from_str(SCRIPT).expect("mapping");
    script_mapping.script =
        Some("change.data.origin = \"1c\"; change.data.remove(\"Комментарий\"); change".into());
    let variants: Vec<(&str, Compiled)> = vec![
        ("none", Compiled::identity()),
        (
            "ten_rules",
            Compiled::new(
                &toml::from_str(TEN_RULES).expect("mapping"),
                std::path::Path::new("."),
            )
            .expect("compiles"),
        ),
        (
            "script",
            Compiled::new(&script_mapping, std::path::Path::new(".")).expect("compiles"),
        ),
    ];
    let remap = Remap::new();
    let budget_ns = 1e9 / args.budget_per_s;
    for (name, compiled) in variants {
        let iterations = if name == "script" { 20_000 } else { 100_000 };
        let start = Instant::now();
        for _ in 0..iterations {
            let data: Value = serde_json::from_str(&raw).expect("data");
            match compiled.apply(change(data), &remap) {
                Outcome::Deliver(c) => {
                    std::hint::black_box(
                        serde_json::value::to_raw_value(&c.data).expect("serialises"),
                    );
                }
                other => panic!("{name}: {other:?}"),
            }
        }
        let ns = start.elapsed().as_nanos() as f64 / iterations as f64;
        println!(
            "{}",
            json!({"scenario": format!("transform-{name}"), "bytes": raw.len(), "ns_per_change": round3(ns),
                   "budget_ns_per_change": round3(budget_ns), "share_of_budget": round3(ns / budget_ns)})
        );
    }
}
