//! What the transform unit tests share: the 1C fixtures as delivery sees them, and short
//! ways to compile a mapping and read an outcome.

use super::{Change, Compiled, Mapping, Outcome, Remap};
use crate::model::{parse_change, Op};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

pub(super) const ORDER: &str = "Document.ЗаказКлиента";
pub(super) const NOMENCLATURE_1: &str = "5f1c2a3e-8d4b-11ee-b9d1-0242ac120002";
pub(super) const NOMENCLATURE_2: &str = "f9a0b1c2-8d4b-11ee-b9d1-0242ac120002";
pub(super) const COUNTERPARTY: &str = "e2f3a4b5-8d4b-11ee-b9d1-0242ac120002";
pub(super) const OFFER: &str = "e8f9a0b1-8d4b-11ee-b9d1-0242ac120002";
pub(super) const FIXTURES: [&str; 5] = [
    "catalog-nomenclature.json",
    "catalog-counterparty.json",
    "document-order.json",
    "object-deletion.json",
    "register-prices.json",
];

fn _assert_send_sync() {
    fn check<T: Send + Sync>() {}
    check::<Compiled>();
}

pub(super) fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/1c")
}

pub(super) fn fixture(name: &str) -> Value {
    let path = fixtures_dir().join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path:?}: {e}"))
}

pub(super) fn from_model(c: crate::model::Change) -> Change {
    Change {
        id: c.id.unwrap_or_else(|| "id-1".into()),
        kind: c.kind,
        reference: c.reference,
        op: c.op,
        data: c.data,
        source: "central".into(),
        seq: c.seq.unwrap_or(1),
    }
}

/// A fixture as delivery sees it.
pub(super) fn load(name: &str) -> Change {
    from_model(parse_change(fixture(name)).unwrap_or_else(|e| panic!("{name}: {e}")))
}

pub(super) fn unposted_order() -> Change {
    let mut order = load("document-order.json");
    order.reference = "b5c6d7e8-0000-11ee-b9d1-0242ac120002".into();
    let data = order.data.as_mut().unwrap();
    data["Ref"] = json!(order.reference);
    data["Posted"] = json!(false);
    order
}

pub(super) fn plain(kind: &str, reference: &str, data: Value) -> Change {
    Change {
        id: "id-1".into(),
        kind: kind.into(),
        reference: reference.into(),
        op: Op::Upsert,
        data: Some(data),
        source: "central".into(),
        seq: 1,
    }
}

pub(super) fn mapping(toml_text: &str) -> Mapping {
    toml::from_str(toml_text).unwrap_or_else(|e| panic!("{toml_text}\n{e}"))
}

pub(super) fn compile(toml_text: &str) -> Compiled {
    Compiled::new(&mapping(toml_text), &fixtures_dir())
        .unwrap_or_else(|problems| panic!("{toml_text}\n{problems:#?}"))
}

pub(super) fn problems(toml_text: &str) -> Vec<String> {
    match Compiled::new(&mapping(toml_text), &fixtures_dir()) {
        Ok(_) => panic!("{toml_text}\nwas accepted"),
        Err(problems) => problems,
    }
}

/// A mapping with rules for the customer order only.
pub(super) fn order_rules(rules: &str) -> Compiled {
    compile(&format!("[types.\"{ORDER}\"]\n{rules}"))
}

pub(super) fn delivered(outcome: Outcome) -> Change {
    match outcome {
        Outcome::Deliver(change) => change,
        other => panic!("expected a delivery, got {other:?}"),
    }
}

pub(super) fn no_remap() -> Remap {
    Remap::new()
}
