//! The 1C XDTO output form (`format = "1c-xdto"`): [`to_xdto`] wraps a change's data the
//! way the 1C platform writes it, the inverse of `model::parse_change`'s XDTO reading.

use super::Change;
use crate::model::Op;
use serde_json::{Map, Value};

/// The 1C platform JSON (XDTO) form of a change's data for `format = "1c-xdto"`:
/// an upsert → `{"#type": "jcfg:<Kind>Object.<Name>", "#value": data}` (record sets:
/// `jcfg:<Kind>RecordSet.<Name>`), a delete → `{"#type": "jcfg:ObjectDeletion", "#value":
/// {"Ref": {"#type": "jcfg:<Kind>Ref.<Name>", "#value": ref}}}`. The inverse of
/// `model::parse_change`'s XDTO reading.
///
/// Details: an object's `#value` gets `"Ref": ref` when its data has no `Ref` (1C and
/// `parse_change` need it). A record set is deleted the 1C way, as an empty record set
/// (`"Records": []`) whose `Filter` is read back from the ref's `Name=Value;…` pairs (`*`:
/// no filter). A type that is not `Kind.Name` with a known kind is written as `jcfg:<type>`
/// as it is, for an upsert's `#type` and for a deletion's `Ref.#type` alike.
pub fn to_xdto(change: &Change) -> Value {
    let known = change
        .kind
        .split_once('.')
        .filter(|(_, name)| !name.is_empty())
        .and_then(|(kind, name)| xdto_names(kind).map(|names| (names, name)));
    match (change.op, known) {
        (Op::Upsert, Some((names, name))) => {
            let mut data = change
                .data
                .clone()
                .unwrap_or_else(|| Value::Object(Map::new()));
            if let (Some(_), Value::Object(obj)) = (names.reference, &mut data) {
                if !obj.contains_key("Ref") {
                    obj.insert("Ref".into(), Value::String(change.reference.clone()));
                }
            }
            xdto(format!("jcfg:{}.{name}", names.object), data)
        }
        (Op::Upsert, None) => xdto(
            format!("jcfg:{}", change.kind),
            change
                .data
                .clone()
                .unwrap_or_else(|| Value::Object(Map::new())),
        ),
        (Op::Delete, Some((names, name))) => match names.reference {
            Some(reference) => deletion(format!("jcfg:{reference}.{name}"), &change.reference),
            None => {
                let mut value = Map::new();
                value.insert("Filter".into(), filter_from_ref(&change.reference));
                value.insert("Records".into(), Value::Array(Vec::new()));
                xdto(
                    format!("jcfg:{}.{name}", names.object),
                    Value::Object(value),
                )
            }
        },
        (Op::Delete, None) => deletion(format!("jcfg:{}", change.kind), &change.reference),
    }
}

fn xdto(xdto_type: String, value: Value) -> Value {
    let mut obj = Map::new();
    obj.insert("#type".into(), Value::String(xdto_type));
    obj.insert("#value".into(), value);
    Value::Object(obj)
}

fn deletion(ref_type: String, reference: &str) -> Value {
    let mut value = Map::new();
    value.insert(
        "Ref".into(),
        xdto(ref_type, Value::String(reference.to_string())),
    );
    xdto("jcfg:ObjectDeletion".into(), Value::Object(value))
}

/// A record set's ref (`Name=Value;Name=Value`, or `*`) as its XDTO `Filter`.
fn filter_from_ref(reference: &str) -> Value {
    if reference == "*" {
        return Value::Array(Vec::new());
    }
    let items = reference
        .split(';')
        .map(|pair| {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            let mut item = Map::new();
            item.insert("Name".into(), Value::String(name.to_string()));
            item.insert("Value".into(), Value::String(value.to_string()));
            Value::Object(item)
        })
        .collect();
    Value::Array(items)
}

/// The XDTO names of a metadata kind.
struct XdtoNames {
    /// `CatalogObject`, `InformationRegisterRecordSet`, …
    object: &'static str,
    /// `CatalogRef`, …; none for record sets.
    reference: Option<&'static str>,
}

fn xdto_names(kind: &str) -> Option<XdtoNames> {
    crate::model::XDTO_KINDS
        .iter()
        .find(|(k, _, _)| *k == kind)
        .map(|(_, object, reference)| XdtoNames {
            object,
            reference: *reference,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::parse_change;
    use crate::transform::test_support::*;
    use serde_json::json;

    #[test]
    fn to_xdto_gives_back_the_1c_fixtures() {
        for file in FIXTURES {
            let original = parse_change(fixture(file)).unwrap();
            let xdto = to_xdto(&from_model(original.clone()));
            assert_eq!(xdto, fixture(file), "{file}");
            let back = parse_change(xdto).unwrap_or_else(|e| panic!("{file}: {e}"));
            assert_eq!(
                (&back.kind, &back.reference, back.op, &back.data),
                (
                    &original.kind,
                    &original.reference,
                    original.op,
                    &original.data
                ),
                "{file}"
            );
        }
    }

    #[test]
    fn to_xdto_round_trips_the_lxbridge_form_and_transformed_changes() {
        let text = std::fs::read_to_string(fixtures_dir().join("lxbridge-form.ndjson")).unwrap();
        for line in text.lines() {
            let original = parse_change(serde_json::from_str(line).unwrap()).unwrap();
            let back = parse_change(to_xdto(&from_model(original.clone())))
                .unwrap_or_else(|e| panic!("{line}: {e}"));
            assert_eq!(
                (&back.kind, back.op),
                (&original.kind, original.op),
                "{line}"
            );
            if original.kind.starts_with("InformationRegister.") {
                // A record set's ref comes from its Filter, which this one has none of.
                assert_eq!(back.data, original.data, "{line}");
            } else {
                assert_eq!(back.reference, original.reference, "{line}");
            }
        }

        // A reshaped order still reads back as the order.
        let compiled = order_rules(
            "keep = [\"Number\", \"Товары\"]\nfields = { \"Товары[].Номенклатура\" = \"product\" }",
        );
        let out = delivered(compiled.apply(load("document-order.json"), &no_remap()));
        let back = parse_change(to_xdto(&out)).unwrap();
        assert_eq!(
            (back.kind.as_str(), back.reference.as_str(), back.op),
            (ORDER, "b5c6d7e8-8d4b-11ee-b9d1-0242ac120002", Op::Upsert)
        );
        assert_eq!(back.data.unwrap()["Товары"][0]["product"], NOMENCLATURE_1);
    }

    #[test]
    fn to_xdto_forms() {
        let delete = |kind: &str, reference: &str| Change {
            op: Op::Delete,
            data: None,
            ..plain(kind, reference, Value::Null)
        };
        // (case, change, XDTO)
        let cases = [
            (
                "an object gets its Ref",
                plain("Catalog.Номенклатура", "g1", json!({"Code": "1"})),
                json!({"#type": "jcfg:CatalogObject.Номенклатура", "#value": {"Code": "1", "Ref": "g1"}}),
            ),
            (
                "every object kind",
                plain(
                    "ChartOfCharacteristicTypes.Виды",
                    "g1",
                    json!({"Ref": "g1"}),
                ),
                json!({"#type": "jcfg:ChartOfCharacteristicTypesObject.Виды", "#value": {"Ref": "g1"}}),
            ),
            (
                "a record set gets no Ref",
                plain(
                    "AccumulationRegister.Остатки",
                    "*",
                    json!({"Filter": [], "Records": []}),
                ),
                json!({"#type": "jcfg:AccumulationRegisterRecordSet.Остатки", "#value": {"Filter": [], "Records": []}}),
            ),
            (
                "an unknown kind is written as it is",
                plain("product", "g1", json!({"a": 1})),
                json!({"#type": "jcfg:product", "#value": {"a": 1}}),
            ),
            (
                "a kind without a name",
                plain("Catalog.", "g1", json!({})),
                json!({"#type": "jcfg:Catalog.", "#value": {}}),
            ),
            (
                "a document deletion",
                delete("Document.ЗаказКлиента", "g2"),
                json!({"#type": "jcfg:ObjectDeletion", "#value": {"Ref": {"#type": "jcfg:DocumentRef.ЗаказКлиента", "#value": "g2"}}}),
            ),
            (
                "an unknown kind's deletion",
                delete("product", "g3"),
                json!({"#type": "jcfg:ObjectDeletion", "#value": {"Ref": {"#type": "jcfg:product", "#value": "g3"}}}),
            ),
            (
                "a record set deletion is an empty record set",
                delete(
                    "InformationRegister.ЦеныНоменклатуры",
                    "Номенклатура=g1;ВидЦены=g2",
                ),
                json!({"#type": "jcfg:InformationRegisterRecordSet.ЦеныНоменклатуры", "#value": {
                    "Filter": [{"Name": "Номенклатура", "Value": "g1"}, {"Name": "ВидЦены", "Value": "g2"}],
                    "Records": []}}),
            ),
            (
                "a whole record set deletion",
                delete("Sequence.Документы", "*"),
                json!({"#type": "jcfg:SequenceRecordSet.Документы", "#value": {"Filter": [], "Records": []}}),
            ),
        ];
        for (case, change, want) in cases {
            let xdto = to_xdto(&change);
            assert_eq!(xdto, want, "{case}");
            if let Ok(back) = parse_change(xdto) {
                assert_eq!(back.kind, change.kind, "{case}");
                assert_eq!(back.reference, change.reference, "{case}");
            }
        }
    }
}
