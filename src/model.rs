//! The change: what a source node sends, in either of its two input forms (lxbridge form or
//! 1C platform XDTO JSON), normalised to one shape, plus the envelope that travels through
//! the broker. Validation errors name the field. Knows nothing about HTTP or AMQP.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    Upsert,
    Delete,
}

impl Op {
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Upsert => "upsert",
            Op::Delete => "delete",
        }
    }
}

/// One object's new state (or deletion) at its source node, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    /// Present when the sender gave one (then it is the idempotency key).
    pub id: Option<String>,
    pub kind: String,
    pub reference: String,
    pub op: Op,
    pub data: Option<Value>,
    pub seq: Option<i64>,
    pub ts: Option<String>,
    /// Extension: part of a member's snapshot for a group resync (see `group`).
    pub initial: bool,
}

/// What is wrong with one change; the message names the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ChangeError(pub String);

fn err<T>(msg: impl Into<String>) -> Result<T, ChangeError> {
    Err(ChangeError(msg.into()))
}

/// RabbitMQ routing keys are at most 255 bytes; the type is the routing key.
pub const MAX_TYPE_BYTES: usize = 255;

fn check_type(kind: &str, field: &str) -> Result<(), ChangeError> {
    if kind.is_empty() {
        return err(format!("{field}: must not be empty"));
    }
    if kind.len() > MAX_TYPE_BYTES {
        return err(format!(
            "{field}: {} bytes long, at most {MAX_TYPE_BYTES} bytes of UTF-8 are allowed",
            kind.len()
        ));
    }
    if kind.chars().any(char::is_whitespace) {
        return err(format!("{field}: {kind:?} contains whitespace"));
    }
    if kind.contains('*') || kind.contains('#') {
        return err(format!(
            "{field}: {kind:?} contains a wildcard character (* or #)"
        ));
    }
    Ok(())
}

fn check_ref(reference: &str, field: &str) -> Result<(), ChangeError> {
    let chars = reference.chars().count();
    if chars == 0 || chars > 256 {
        return err(format!("{field}: must be 1-256 characters, got {chars}"));
    }
    Ok(())
}

/// The optional `id`, `seq`, `ts` and `initial` of a change (also accepted beside
/// `#type`/`#value`).
type Meta = (Option<String>, Option<i64>, Option<String>, bool);

fn take_meta(obj: &mut Map<String, Value>) -> Result<Meta, ChangeError> {
    let id = match obj.remove("id") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if (1..=128).contains(&s.chars().count()) => Some(s),
        Some(Value::String(s)) => {
            return err(format!(
                "id: must be 1-128 characters, got {}",
                s.chars().count()
            ))
        }
        Some(other) => return err(format!("id: expected a string, got {}", json_kind(&other))),
    };
    let seq = match obj.remove("seq") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) if n.as_i64().is_some() => n.as_i64(),
        Some(other) => return err(format!("seq: expected an integer, got {other}")),
    };
    let ts = match obj.remove("ts") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => {
            if time::OffsetDateTime::parse(&s, &time::format_description::well_known::Rfc3339)
                .is_err()
            {
                return err(format!(
                    "ts: {s:?} is not an RFC 3339 time like 2026-11-20T14:30:00+03:00"
                ));
            }
            Some(s)
        }
        Some(other) => return err(format!("ts: expected a string, got {}", json_kind(&other))),
    };
    let initial = match obj.remove("initial") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => b,
        Some(other) => {
            return err(format!(
                "initial: expected true or false, got {}",
                json_kind(&other)
            ))
        }
    };
    Ok((id, seq, ts, initial))
}

/// Parses one change object in either form.
pub fn parse_change(value: Value) -> Result<Change, ChangeError> {
    let Value::Object(mut obj) = value else {
        return err(format!(
            "change: expected a JSON object, got {}",
            json_kind(&value)
        ));
    };
    if obj.contains_key("#type") {
        let mut change = parse_xdto(&mut obj)?;
        (change.id, change.seq, change.ts, change.initial) = take_meta(&mut obj)?;
        if let Some(key) = obj.keys().next() {
            return err(format!("{key}: unknown field beside #type and #value"));
        }
        return Ok(change);
    }
    for key in obj.keys() {
        if !matches!(
            key.as_str(),
            "id" | "type" | "ref" | "op" | "data" | "seq" | "ts" | "initial"
        ) {
            return err(format!(
                "{key}: unknown field (a change has id, type, ref, op, data, seq, ts, initial)"
            ));
        }
    }
    let (id, seq, ts, initial) = take_meta(&mut obj)?;
    let kind = match obj.remove("type") {
        Some(Value::String(s)) => s,
        None | Some(Value::Null) => return err("type: missing"),
        Some(other) => {
            return err(format!(
                "type: expected a string, got {}",
                json_kind(&other)
            ))
        }
    };
    check_type(&kind, "type")?;
    let reference = match obj.remove("ref") {
        Some(Value::String(s)) => s,
        None | Some(Value::Null) => return err("ref: missing"),
        Some(other) => return err(format!("ref: expected a string, got {}", json_kind(&other))),
    };
    check_ref(&reference, "ref")?;
    let op = match obj.remove("op") {
        None | Some(Value::Null) => Op::Upsert,
        Some(Value::String(s)) if s == "upsert" => Op::Upsert,
        Some(Value::String(s)) if s == "delete" => Op::Delete,
        Some(other) => {
            return err(format!(
                "op: expected \"upsert\" or \"delete\", got {other}"
            ))
        }
    };
    let data = match obj.remove("data") {
        None | Some(Value::Null) => None,
        Some(v @ Value::Object(_)) => Some(v),
        Some(other) => {
            return err(format!(
                "data: expected an object, got {}",
                json_kind(&other)
            ))
        }
    };
    if op == Op::Upsert && data.is_none() {
        return err("data: missing (required when op is \"upsert\")");
    }
    Ok(Change {
        id,
        kind,
        reference,
        op,
        data,
        seq,
        ts,
        initial,
    })
}

/// 1C metadata kinds and their XDTO names: (kind, object or record set type, reference
/// type — none for record sets). Read both ways: here for input, in `transform` for output.
pub(crate) const XDTO_KINDS: &[(&str, &str, Option<&str>)] = &[
    ("Catalog", "CatalogObject", Some("CatalogRef")),
    ("Document", "DocumentObject", Some("DocumentRef")),
    (
        "ChartOfCharacteristicTypes",
        "ChartOfCharacteristicTypesObject",
        Some("ChartOfCharacteristicTypesRef"),
    ),
    (
        "ChartOfAccounts",
        "ChartOfAccountsObject",
        Some("ChartOfAccountsRef"),
    ),
    (
        "ChartOfCalculationTypes",
        "ChartOfCalculationTypesObject",
        Some("ChartOfCalculationTypesRef"),
    ),
    (
        "ExchangePlan",
        "ExchangePlanObject",
        Some("ExchangePlanRef"),
    ),
    (
        "BusinessProcess",
        "BusinessProcessObject",
        Some("BusinessProcessRef"),
    ),
    ("Task", "TaskObject", Some("TaskRef")),
    ("InformationRegister", "InformationRegisterRecordSet", None),
    (
        "AccumulationRegister",
        "AccumulationRegisterRecordSet",
        None,
    ),
    ("AccountingRegister", "AccountingRegisterRecordSet", None),
    ("CalculationRegister", "CalculationRegisterRecordSet", None),
    ("Sequence", "SequenceRecordSet", None),
];

/// Maps the XDTO value-type prefix to the metadata kind: `CatalogObject` → `Catalog`,
/// `InformationRegisterRecordSet` → `InformationRegister`; true for a record set.
fn xdto_kind(prefix: &str) -> Option<(&'static str, bool)> {
    XDTO_KINDS
        .iter()
        .find(|(_, object, _)| *object == prefix)
        .map(|(kind, _, reference)| (*kind, reference.is_none()))
}

/// Maps a reference type prefix (`CatalogRef`) to its kind (`Catalog`); `EnumRef` → `Enum`.
pub(crate) fn xdto_ref_kind(prefix: &str) -> Option<&'static str> {
    if prefix == "EnumRef" {
        return Some("Enum");
    }
    XDTO_KINDS
        .iter()
        .find(|(_, _, reference)| *reference == Some(prefix))
        .map(|(kind, _, _)| *kind)
}

/// Splits `jcfg:CatalogObject.Products` into (`CatalogObject`, `Products`).
fn split_xdto_type(t: &str) -> Option<(&str, &str)> {
    let t = t.strip_prefix("jcfg:").unwrap_or(t);
    t.split_once('.')
}

/// The plain value of a field that may be typed (`{"#type", "#value"}`).
fn plain_value(v: &Value) -> String {
    let v = match v {
        Value::Object(o) if o.contains_key("#value") => &o["#value"],
        other => other,
    };
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn parse_xdto(obj: &mut Map<String, Value>) -> Result<Change, ChangeError> {
    let xdto_type = match obj.remove("#type") {
        Some(Value::String(s)) => s,
        Some(other) => {
            return err(format!(
                "#type: expected a string, got {}",
                json_kind(&other)
            ))
        }
        None => unreachable!("caller checked #type"),
    };
    let value = match obj.remove("#value") {
        Some(Value::Object(v)) => v,
        Some(other) => {
            return err(format!(
                "#value: expected an object, got {}",
                json_kind(&other)
            ))
        }
        None => return err("#value: missing"),
    };
    if xdto_type == "jcfg:ObjectDeletion" || xdto_type == "ObjectDeletion" {
        let Some(Value::Object(r)) = value.get("Ref") else {
            return err("#value.Ref: missing or not a typed reference {\"#type\", \"#value\"}");
        };
        let ref_type = r.get("#type").and_then(Value::as_str).unwrap_or_default();
        let (prefix, name) = split_xdto_type(ref_type).ok_or_else(|| {
            ChangeError(format!(
                "#value.Ref.#type: {ref_type:?} is not like \"jcfg:CatalogRef.Name\""
            ))
        })?;
        let kind = xdto_ref_kind(prefix).ok_or_else(|| {
            ChangeError(format!(
                "#value.Ref.#type: unknown reference kind {prefix:?}"
            ))
        })?;
        let reference = match r.get("#value") {
            Some(Value::String(s)) => s.clone(),
            _ => return err("#value.Ref.#value: missing or not a string"),
        };
        let kind = format!("{kind}.{name}");
        check_type(&kind, "#value.Ref.#type")?;
        check_ref(&reference, "#value.Ref.#value")?;
        return Ok(Change {
            id: None,
            kind,
            reference,
            op: Op::Delete,
            data: None,
            seq: None,
            ts: None,
            initial: false,
        });
    }
    let (prefix, name) = split_xdto_type(&xdto_type).ok_or_else(|| {
        ChangeError(format!(
            "#type: {xdto_type:?} is not like \"jcfg:CatalogObject.Name\""
        ))
    })?;
    let (kind, record_set) = xdto_kind(prefix).ok_or_else(|| {
        ChangeError(format!(
            "#type: unknown object kind {prefix:?} in {xdto_type:?}"
        ))
    })?;
    let kind = format!("{kind}.{name}");
    check_type(&kind, "#type")?;
    let reference = if record_set {
        match value.get("Filter") {
            None | Some(Value::Null) => "*".to_string(),
            Some(Value::Array(items)) if items.is_empty() => "*".to_string(),
            Some(Value::Array(items)) => {
                let mut parts = Vec::with_capacity(items.len());
                for (i, item) in items.iter().enumerate() {
                    let name = item.get("Name").and_then(Value::as_str).ok_or_else(|| {
                        ChangeError(format!("#value.Filter[{i}].Name: missing or not a string"))
                    })?;
                    let value = item
                        .get("Value")
                        .ok_or_else(|| ChangeError(format!("#value.Filter[{i}].Value: missing")))?;
                    parts.push(format!("{name}={}", plain_value(value)));
                }
                parts.join(";")
            }
            Some(other) => {
                return err(format!(
                    "#value.Filter: expected an array, got {}",
                    json_kind(other)
                ))
            }
        }
    } else {
        match value.get("Ref") {
            Some(Value::String(s)) => s.clone(),
            Some(other @ Value::Object(_)) => plain_value(other),
            _ => return err("#value.Ref: missing or not a string"),
        }
    };
    check_ref(
        &reference,
        if record_set {
            "#value.Filter"
        } else {
            "#value.Ref"
        },
    )?;
    Ok(Change {
        id: None,
        kind,
        reference,
        op: Op::Upsert,
        data: Some(Value::Object(value)),
        seq: None,
        ts: None,
        initial: false,
    })
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A change as it travels through the broker: the message body, written once at ingress and
/// never rewritten (attempt counts and errors travel in AMQP headers).
#[derive(Debug, Serialize)]
pub struct Envelope<'a> {
    pub id: &'a str,
    #[serde(rename = "type")]
    pub kind: &'a str,
    #[serde(rename = "ref")]
    pub reference: &'a str,
    pub op: Op,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<&'a Value>,
    pub source: &'a str,
    pub seq: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ts: Option<&'a str>,
    /// Milliseconds since the Unix epoch when ingress accepted it (for end-to-end latency).
    pub accepted_ms: i64,
    /// Part of a member's snapshot for a group resync.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub initial: bool,
}

/// The envelope read back by a consumer; `data` stays raw JSON so delivery never re-parses it.
#[derive(Debug, Deserialize)]
pub struct StoredChange {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(rename = "ref")]
    pub reference: String,
    pub op: Op,
    #[serde(default)]
    pub data: Option<Box<RawValue>>,
    pub source: String,
    pub seq: i64,
    #[serde(default)]
    pub ts: Option<String>,
    pub accepted_ms: i64,
    #[serde(default)]
    pub initial: bool,
}

/// One change as a target receives it (docs/api.md "Delivering to a push node").
#[derive(Debug, Serialize)]
pub struct OutgoingChange<'a> {
    pub id: &'a str,
    #[serde(rename = "type")]
    pub kind: &'a str,
    #[serde(rename = "ref")]
    pub reference: &'a str,
    pub op: Op,
    pub data: Option<&'a RawValue>,
    pub source: &'a str,
    pub seq: i64,
    pub attempt: u32,
    /// The target's own ref for the object, when its remap table knows it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_ref: Option<&'a str>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn fixture(name: &str) -> Value {
        let path = format!("{}/tests/fixtures/1c/{name}", env!("CARGO_MANIFEST_DIR"));
        serde_json::from_str(&std::fs::read_to_string(&path).expect(&path)).expect(&path)
    }

    #[test]
    fn xdto_fixtures_normalise_as_expected() {
        let expected = fixture("expected.json");
        let expected = expected.as_object().unwrap();
        assert_eq!(expected.len(), 5);
        for (file, want) in expected {
            let change = parse_change(fixture(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
            assert_eq!(change.kind, want["type"].as_str().unwrap(), "{file} type");
            assert_eq!(
                change.reference,
                want["ref"].as_str().unwrap(),
                "{file} ref"
            );
            let op = if change.op == Op::Delete {
                "delete"
            } else {
                "upsert"
            };
            assert_eq!(op, want["op"].as_str().unwrap(), "{file} op");
            if change.op == Op::Upsert {
                assert!(change.data.as_ref().unwrap().is_object(), "{file} data");
            }
        }
    }

    #[test]
    fn xdto_data_is_the_value() {
        let change = parse_change(fixture("document-order.json")).unwrap();
        let data = change.data.unwrap();
        assert_eq!(data["Number"], "ЦБ-000315");
        assert_eq!(data["Товары"].as_array().unwrap().len(), 2);
    }

    #[test]
    fn lxbridge_form_fixture_lines_parse() {
        let path = format!(
            "{}/tests/fixtures/1c/lxbridge-form.ndjson",
            env!("CARGO_MANIFEST_DIR")
        );
        let text = std::fs::read_to_string(path).unwrap();
        let changes: Vec<Change> = text
            .lines()
            .map(|l| parse_change(serde_json::from_str(l).unwrap()).unwrap())
            .collect();
        assert_eq!(changes.len(), 4);
        assert_eq!(changes[0].id.as_deref(), Some("central-000001"));
        assert_eq!(changes[2].op, Op::Delete);
        assert_eq!(changes[3].seq, Some(7));
        assert_eq!(changes[3].id, None);
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (json!({"ref": "r", "data": {}}), "type: missing"),
            (json!({"type": "Catalog.X", "data": {}}), "ref: missing"),
            (json!({"type": "Catalog.X", "ref": "r"}), "data: missing"),
            (
                json!({"type": "Catalog.X", "ref": "r", "op": "merge", "data": {}}),
                "op:",
            ),
            (
                json!({"type": "Catalog X", "ref": "r", "data": {}}),
                "type:",
            ),
            (json!({"type": "Catalog.X", "ref": "", "data": {}}), "ref:"),
            (
                json!({"type": "Catalog.X", "ref": "r", "data": []}),
                "data: expected an object",
            ),
            (
                json!({"type": "Catalog.X", "ref": "r", "data": {}, "seq": "1"}),
                "seq:",
            ),
            (
                json!({"type": "Catalog.X", "ref": "r", "data": {}, "ts": "yesterday"}),
                "ts:",
            ),
            (
                json!({"type": "Catalog.X", "ref": "r", "data": {}, "id": ""}),
                "id:",
            ),
            (
                json!({"type": "Catalog.X", "ref": "r", "data": {}, "colour": 1}),
                "colour: unknown field",
            ),
            (json!([1]), "change: expected a JSON object"),
            (
                json!({"#type": "jcfg:WidgetObject.X", "#value": {"Ref": "r"}}),
                "#type: unknown object kind",
            ),
            (
                json!({"#type": "jcfg:CatalogObject.X", "#value": {}}),
                "#value.Ref",
            ),
            (
                json!({"#type": "jcfg:ObjectDeletion", "#value": {"Ref": "r"}}),
                "#value.Ref",
            ),
        ];
        for (input, needle) in cases {
            let e = parse_change(input.clone()).expect_err(&input.to_string());
            assert!(
                e.0.contains(needle),
                "{input} gave {e:?}, wanted {needle:?}"
            );
        }
    }

    #[test]
    fn delete_needs_no_data_and_long_cyrillic_type_is_measured_in_bytes() {
        let c = parse_change(json!({"type": "Catalog.X", "ref": "r", "op": "delete"})).unwrap();
        assert_eq!(c.op, Op::Delete);
        let long = format!("Справочник.{}", "Я".repeat(130));
        let e = parse_change(json!({"type": long, "ref": "r", "data": {}})).unwrap_err();
        assert!(e.0.contains("bytes"), "{e}");
    }

    #[test]
    fn record_set_with_empty_filter_has_star_ref() {
        let c = parse_change(
            json!({"#type": "jcfg:AccumulationRegisterRecordSet.Остатки",
            "#value": {"Filter": [], "Records": []}}),
        )
        .unwrap();
        assert_eq!(c.kind, "AccumulationRegister.Остатки");
        assert_eq!(c.reference, "*");
    }
}
