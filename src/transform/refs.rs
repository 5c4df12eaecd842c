//! References inside a change's data: 1C XDTO typed references
//! (`{"#type": "jcfg:CatalogRef.X", "#value": guid}` anywhere) and the declared `refs` of a
//! type (plain GUIDs at given paths): finding them ([`references`]) and rewriting typed ones
//! through the remap table ([`remap_typed_refs`]; declared ones: `Rules::remap_declared`).

use super::path::{visit_values, FieldPath};
use super::{Change, Reference, Remap};
use serde_json::{Map, Value};
use std::borrow::Cow;
use std::collections::BTreeSet;

/// The empty reference of 1C.
const ZERO_GUID: &str = "00000000-0000-0000-0000-000000000000";

/// What [`super::Compiled::references`] answers, given the declared `refs` of the change's
/// source type (path → referenced type).
pub(super) fn references(change: &Change, declared: &[(FieldPath, String)]) -> Vec<Reference> {
    let Some(data) = &change.data else {
        return Vec::new();
    };
    let mut found = BTreeSet::new();
    let mut add = |kind: Cow<'_, str>, reference: &str| {
        if reference == ZERO_GUID || (reference == change.reference && kind.as_ref() == change.kind)
        {
            return;
        }
        found.insert(Reference {
            kind: kind.into_owned(),
            reference: reference.to_string(),
        });
    };
    visit_typed_refs(data, &mut |r: TypedRef<'_>| {
        add(Cow::Owned(r.kind()), r.guid);
    });
    for (path, kind) in declared {
        visit_values(data, &path.segments, &mut |v| {
            if let Value::String(s) = v {
                if !s.is_empty() {
                    add(Cow::Borrowed(kind), s);
                }
            }
        });
    }
    found.into_iter().collect()
}

/// A 1C XDTO typed reference found in data: `{"#type": "jcfg:CatalogRef.X", "#value": guid}`.
struct TypedRef<'a> {
    kind: &'static str,
    name: &'a str,
    guid: &'a str,
}

impl TypedRef<'_> {
    /// `Catalog.X`.
    fn kind(&self) -> String {
        format!("{}.{}", self.kind, self.name)
    }
}

/// The typed reference `obj` is, if it is one (enumeration values are not).
fn typed_ref(obj: &Map<String, Value>) -> Option<TypedRef<'_>> {
    if obj.len() != 2 {
        return None;
    }
    let xdto_type = obj.get("#type")?.as_str()?;
    let guid = obj.get("#value")?.as_str()?;
    let (prefix, name) = xdto_type.strip_prefix("jcfg:")?.split_once('.')?;
    let kind = crate::model::xdto_ref_kind(prefix)?;
    if kind == "Enum" || name.is_empty() {
        return None;
    }
    Some(TypedRef { kind, name, guid })
}

/// Calls `f` for every typed reference anywhere in `v`.
fn visit_typed_refs<'a>(v: &'a Value, f: &mut impl FnMut(TypedRef<'a>)) {
    match v {
        Value::Object(obj) => match typed_ref(obj) {
            Some(r) => f(r),
            None => obj.values().for_each(|v| visit_typed_refs(v, f)),
        },
        Value::Array(items) => items.iter().for_each(|v| visit_typed_refs(v, f)),
        _ => {}
    }
}

/// Rewrites the `#value` of every typed reference in `v` that `remap` knows.
pub(super) fn remap_typed_refs(v: &mut Value, remap: &Remap) {
    match v {
        Value::Object(obj) => {
            let target = typed_ref(obj).map(|r| remap.get(&(r.kind(), r.guid.to_string())));
            match target {
                Some(Some(target)) => {
                    obj.insert("#value".into(), Value::String(target.clone()));
                }
                Some(None) => {}
                None => obj.values_mut().for_each(|v| remap_typed_refs(v, remap)),
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|v| remap_typed_refs(v, remap)),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transform::test_support::*;
    use crate::transform::Compiled;
    use serde_json::json;

    #[test]
    fn references_are_found_in_typed_values_and_declared_fields() {
        let props = "ChartOfCharacteristicTypes.ДополнительныеРеквизитыИСведения";
        let odd_data = json!({
            "a": {"#type": "jcfg:CatalogRef.X", "#value": "g1"},
            "b": [
                {"#type": "jcfg:CatalogRef.X", "#value": "g1"},
                {"#type": "jcfg:EnumRef.Статусы", "#value": "Новый"},
                {"#type": "jcfg:CatalogRef.X", "#value": "g2", "extra": 1},
                {"#type": "jxs:string", "#value": "g3"},
                {"#type": "jcfg:CatalogRef.X", "#value": 5},
                {"#type": "jcfg:WidgetRef.X", "#value": "g4"},
                {"#type": "jcfg:CatalogRef.Self", "#value": "own"},
                {"#type": "jcfg:DocumentRef.Y", "#value": ZERO_GUID},
                {"deep": {"rows": [{"#type": "jcfg:TaskRef.Задача", "#value": "t1"}]}}
            ],
            "c": "g1",
            "d": "",
            "e": 42,
            "own": "own"
        });
        // (case, change, rules, expected (type, ref) sorted)
        type Case<'a> = (&'a str, Change, &'a str, Vec<(&'a str, &'a str)>);
        let cases: Vec<Case> = vec![
            (
                "typed refs in nested rows",
                load("catalog-nomenclature.json"),
                "",
                vec![(
                    "Catalog.ЗначенияСвойствОбъектов",
                    "9d0e1f20-8d4b-11ee-b9d1-0242ac120002",
                )],
            ),
            (
                "declared refs; zero GUID and own ref left out",
                load("catalog-nomenclature.json"),
                r#"[types."Catalog.Номенклатура"]
refs = { Parent = "Catalog.Номенклатура", Ref = "Catalog.Номенклатура", "ЕдиницаИзмерения" = "Catalog.ЕдиницыИзмерения", "ДополнительныеРеквизиты[].Свойство" = "ChartOfCharacteristicTypes.ДополнительныеРеквизитыИСведения", "Нет.Такого" = "Catalog.Нет" }"#,
                vec![
                    (
                        "Catalog.ЕдиницыИзмерения",
                        "a3d4e5f6-8d4b-11ee-b9d1-0242ac120002",
                    ),
                    (
                        "Catalog.ЗначенияСвойствОбъектов",
                        "9d0e1f20-8d4b-11ee-b9d1-0242ac120002",
                    ),
                    (props, "7b8c9d0e-8d4b-11ee-b9d1-0242ac120002"),
                    (props, "8c9d0e1f-8d4b-11ee-b9d1-0242ac120002"),
                ],
            ),
            (
                "declared refs of the order, in rows too",
                load("document-order.json"),
                r#"[types."Document.ЗаказКлиента"]
refs = { "Контрагент" = "Catalog.Контрагенты", "Товары[].Номенклатура" = "Catalog.Номенклатура" }"#,
                vec![
                    ("Catalog.Контрагенты", COUNTERPARTY),
                    ("Catalog.Номенклатура", NOMENCLATURE_1),
                    ("Catalog.Номенклатура", NOMENCLATURE_2),
                    ("Document.КоммерческоеПредложениеКлиенту", OFFER),
                ],
            ),
            (
                "declared through the \"*\" rules",
                load("document-order.json"),
                r#"[types."*"]
refs = { "Контрагент" = "Catalog.Контрагенты" }"#,
                vec![
                    ("Catalog.Контрагенты", COUNTERPARTY),
                    ("Document.КоммерческоеПредложениеКлиенту", OFFER),
                ],
            ),
            (
                "rules of another type don't count",
                load("document-order.json"),
                r#"[types."Document.Другой"]
refs = { "Контрагент" = "Catalog.Контрагенты" }"#,
                vec![("Document.КоммерческоеПредложениеКлиенту", OFFER)],
            ),
            (
                "record set filter values",
                load("register-prices.json"),
                "",
                vec![
                    ("Catalog.ВидыЦен", "1b2c3d4e-8d4b-11ee-b9d1-0242ac120002"),
                    ("Catalog.Номенклатура", NOMENCLATURE_1),
                ],
            ),
            (
                "a deletion has none",
                load("object-deletion.json"),
                "",
                vec![],
            ),
            (
                "only exact typed refs, no enums, no repeats",
                plain("Catalog.Self", "own", odd_data),
                r#"[types."Catalog.Self"]
refs = { c = "Catalog.X", d = "Catalog.X", e = "Catalog.X", own = "Catalog.Self", "b[]" = "Catalog.Y" }"#,
                vec![("Catalog.X", "g1"), ("Task.Задача", "t1")],
            ),
        ];
        for (case, change, rules, want) in cases {
            let got = compile(rules).references(&change);
            let want: Vec<Reference> = want
                .into_iter()
                .map(|(kind, reference)| Reference {
                    kind: kind.into(),
                    reference: reference.into(),
                })
                .collect();
            assert_eq!(got, want, "{case}");
        }
    }

    #[test]
    fn remap_rewrites_typed_and_declared_refs() {
        let pair = |kind: &str, from: &str, to: &str| {
            ((kind.to_string(), from.to_string()), to.to_string())
        };
        let remap: Remap = [
            pair("Catalog.Контрагенты", COUNTERPARTY, "ERP-CP-42"),
            pair("Catalog.Номенклатура", NOMENCLATURE_1, "ERP-N-1"),
            pair("Document.КоммерческоеПредложениеКлиенту", OFFER, "ERP-KP-7"),
            pair(ORDER, "b5c6d7e8-8d4b-11ee-b9d1-0242ac120002", "ERP-ORDER"),
            pair(
                "Catalog.ЗначенияСвойствОбъектов",
                "9d0e1f20-8d4b-11ee-b9d1-0242ac120002",
                "ERP-V-9",
            ),
        ]
        .into_iter()
        .collect();
        let compiled = order_rules(
            r#"refs = { "Контрагент" = "Catalog.Контрагенты", "Товары[].Номенклатура" = "Catalog.Номенклатура" }
filter = [{ field = "Контрагент", eq = "e2f3a4b5-8d4b-11ee-b9d1-0242ac120002" }]
fields = { "Товары[].Номенклатура" = "product" }"#,
        );
        let out = delivered(compiled.apply(load("document-order.json"), &remap));
        assert_eq!(
            out.reference, "b5c6d7e8-8d4b-11ee-b9d1-0242ac120002",
            "own ref stays"
        );
        let data = out.data.unwrap();
        assert_eq!(data["Ref"], "b5c6d7e8-8d4b-11ee-b9d1-0242ac120002");
        assert_eq!(data["Контрагент"], "ERP-CP-42");
        assert_eq!(data["Товары"][0]["product"], "ERP-N-1");
        assert_eq!(
            data["Товары"][1]["product"], NOMENCLATURE_2,
            "not in the table"
        );
        assert_eq!(
            data["Основание"],
            json!({"#type": "jcfg:DocumentRef.КоммерческоеПредложениеКлиенту", "#value": "ERP-KP-7"})
        );
        assert_eq!(
            data["Организация"], "c6d7e8f9-8d4b-11ee-b9d1-0242ac120002",
            "not declared"
        );

        // Typed refs are remapped without any rules too.
        let out = delivered(Compiled::identity().apply(load("catalog-nomenclature.json"), &remap));
        let value = &out.data.unwrap()["ДополнительныеРеквизиты"][1]["Значение"];
        assert_eq!(value["#value"], "ERP-V-9");
        assert_eq!(value["#type"], "jcfg:CatalogRef.ЗначенияСвойствОбъектов");
    }
}
