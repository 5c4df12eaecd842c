//! One type's mapping rules: checked and compiled from [`TypeRules`] (every problem a
//! sentence naming type, section and path), then run by `Compiled::apply`: skip, filter,
//! the remap of declared references, value maps, defaults, set, drop, keep, field renames.

use super::path::{
    new_field_name, parse_path, visit_objects_mut, visit_values, visit_values_mut, FieldPath,
};
use super::{Condition, Remap, TypeRules};
use crate::model::MAX_TYPE_BYTES;
use serde_json::Value;
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};

#[derive(Debug)]
enum Test {
    Eq(Value),
    Ne(Value),
    In(Vec<Value>),
    Exists(bool),
}

#[derive(Debug)]
struct Check {
    path: FieldPath,
    test: Test,
}

impl Check {
    fn holds(&self, found: &[&Value]) -> bool {
        match &self.test {
            Test::Eq(want) => found.iter().any(|v| json_eq(v, want)),
            Test::Ne(want) => !found.iter().any(|v| json_eq(v, want)),
            Test::In(list) => found
                .iter()
                .any(|v| list.iter().any(|want| json_eq(v, want))),
            Test::Exists(want) => found.iter().any(|v| !v.is_null()) == *want,
        }
    }

    /// `eq true`, `in ["a","b"]`, …
    fn describe(&self) -> String {
        match &self.test {
            Test::Eq(v) => format!("eq {}", short_json(v)),
            Test::Ne(v) => format!("ne {}", short_json(v)),
            Test::In(list) => format!("in {}", short_json(&Value::Array(list.clone()))),
            Test::Exists(b) => format!("exists {b}"),
        }
    }
}

/// One type's rules, checked and with their paths parsed.
#[derive(Debug, Default)]
pub(super) struct Rules {
    pub(super) rename: Option<String>,
    pub(super) skip: bool,
    filter: Vec<Check>,
    pub(super) refs: Vec<(FieldPath, String)>,
    values: Vec<(FieldPath, HashMap<String, Value>)>,
    defaults: Vec<(FieldPath, Value)>,
    set: Vec<(FieldPath, Value)>,
    drop: Vec<FieldPath>,
    /// With the first names of the `set` and `defaults` paths added.
    keep: Option<HashSet<String>>,
    /// Deepest first; the new last name.
    fields: Vec<(FieldPath, String)>,
    /// The key match field (a top-level name).
    pub(super) key: Option<String>,
}

impl Rules {
    /// Checks and compiles one type's rules, adding a sentence to `problems` for each
    /// problem (in the order of the sections below).
    pub(super) fn compile(kind: &str, rules: &TypeRules, problems: &mut Vec<String>) -> Rules {
        let at = |section: &str| format!("types.{kind:?}.{section}");
        let rename = compile_rename(&at("rename"), rules.rename.as_ref(), problems);
        let filter = compile_filter(&at("filter"), &rules.filter, problems);
        let refs = compile_refs(&at("refs"), &rules.refs, problems);
        let values = compile_values(&at("values"), &rules.values, problems);
        let defaults = compile_writes(&at("defaults"), &rules.defaults, problems);
        let key = compile_key(&at("key"), rules.key.as_ref(), problems);
        let set = compile_writes(&at("set"), &rules.set, problems);
        let drop = compile_drop(&at("drop"), &rules.drop, problems);
        let keep = rules.keep.as_ref().map(|keep| {
            let written = set.iter().chain(&defaults).map(|(path, _)| path);
            compile_keep(&at("keep"), keep, written, problems)
        });
        let fields = compile_fields(&at("fields"), &rules.fields, problems);
        Rules {
            rename,
            skip: rules.skip,
            filter,
            refs,
            values,
            defaults,
            set,
            drop,
            keep,
            fields,
            key,
        }
    }

    pub(super) fn is_noop(&self) -> bool {
        let Rules {
            rename,
            skip,
            filter,
            refs,
            values,
            defaults,
            set,
            drop,
            keep,
            fields,
            key: _,
        } = self;
        rename.is_none()
            && !skip
            && filter.is_empty()
            && refs.is_empty()
            && values.is_empty()
            && defaults.is_empty()
            && set.is_empty()
            && drop.is_empty()
            && keep.is_none()
            && fields.is_empty()
    }

    /// Ok when every condition holds; else the reason, naming the first failing one.
    pub(super) fn check_filter(&self, data: Option<&Value>) -> Result<(), String> {
        check_all(&self.filter, data)
    }

    /// Replaces the plain GUIDs at the declared reference paths that `remap` knows.
    pub(super) fn remap_declared(&self, data: &mut Value, remap: &Remap) {
        for (path, kind) in &self.refs {
            visit_values_mut(data, &path.segments, &mut |v| {
                if let Value::String(s) = v {
                    if let Some(target) = remap.get(&(kind.clone(), s.clone())) {
                        s.clone_from(target);
                    }
                }
            });
        }
    }

    /// Value maps, defaults, constants, drop, keep, field renames.
    pub(super) fn reshape(&self, data: &mut Value) {
        for (path, map) in &self.values {
            visit_values_mut(data, &path.segments, &mut |v| {
                let to = value_text(v).and_then(|text| map.get(text.as_ref()).cloned());
                if let Some(to) = to {
                    *v = to;
                }
            });
        }
        for (path, value) in &self.defaults {
            let name = &path.last().name;
            visit_objects_mut(data, path.parent(), true, &mut |obj| {
                if obj.get(name).is_none_or(Value::is_null) {
                    obj.insert(name.clone(), value.clone());
                }
            });
        }
        for (path, value) in &self.set {
            let name = &path.last().name;
            visit_objects_mut(data, path.parent(), true, &mut |obj| {
                obj.insert(name.clone(), value.clone());
            });
        }
        for path in &self.drop {
            let name = &path.last().name;
            visit_objects_mut(data, path.parent(), false, &mut |obj| {
                obj.remove(name);
            });
        }
        if let (Some(keep), Value::Object(obj)) = (&self.keep, &mut *data) {
            obj.retain(|name, _| keep.contains(name));
        }
        for (path, new_name) in &self.fields {
            let name = &path.last().name;
            visit_objects_mut(data, path.parent(), false, &mut |obj| {
                if let Some(v) = obj.remove(name) {
                    obj.insert(new_name.clone(), v);
                }
            });
        }
    }
}

// The sections of `Rules::compile`; `at` names the section (`types."Catalog.X".filter`).

fn compile_rename(at: &str, name: Option<&String>, problems: &mut Vec<String>) -> Option<String> {
    let name = name?;
    match check_type_name(name) {
        Ok(()) => Some(name.clone()),
        Err(e) => {
            problems.push(format!("{at}: {e}"));
            None
        }
    }
}

/// Conditions checked and compiled outside a route's rules (a webhook entry's `filter`).
#[derive(Debug)]
pub struct Filter(Vec<Check>);

impl Filter {
    /// Checks `conditions`; every problem is a sentence starting with `at`.
    pub fn compile(at: &str, conditions: &[Condition]) -> Result<Filter, Vec<String>> {
        let mut problems = Vec::new();
        let checks = compile_filter(at, conditions, &mut problems);
        if problems.is_empty() {
            Ok(Filter(checks))
        } else {
            Err(problems)
        }
    }

    /// `Ok` when every condition holds on `data`, else the first that doesn't, in words.
    pub fn check(&self, data: &Value) -> Result<(), String> {
        check_all(&self.0, Some(data))
    }
}

/// Every check on `data`: the first not met, in words.
fn check_all(checks: &[Check], data: Option<&Value>) -> Result<(), String> {
    for check in checks {
        let mut found = Vec::new();
        if let Some(data) = data {
            visit_values(data, &check.path.segments, &mut |v| found.push(v));
        }
        if !check.holds(&found) {
            let path = &check.path.text;
            let actual = match found.as_slice() {
                [] => "absent".to_string(),
                [one] => short_json(one),
                many => short_json(&Value::Array(many.iter().map(|v| (*v).clone()).collect())),
            };
            return Err(format!(
                "filter {path} {} is not met: {path} is {actual}",
                check.describe()
            ));
        }
    }
    Ok(())
}

fn compile_filter(at: &str, filter: &[Condition], problems: &mut Vec<String>) -> Vec<Check> {
    filter
        .iter()
        .enumerate()
        .filter_map(|(i, c)| {
            let at = format!("{at}[{i}] (field {:?})", c.field);
            compile_condition(&at, c, problems)
        })
        .collect()
}

/// One condition: exactly one test, and a path.
fn compile_condition(at: &str, c: &Condition, problems: &mut Vec<String>) -> Option<Check> {
    let given: Vec<&str> = [
        ("eq", c.eq.is_some()),
        ("ne", c.ne.is_some()),
        ("in", c.one_of.is_some()),
        ("exists", c.exists.is_some()),
    ]
    .into_iter()
    .filter_map(|(name, present)| present.then_some(name))
    .collect();
    if given.len() != 1 {
        let found = if given.is_empty() {
            "none".to_string()
        } else {
            given.join(" and ")
        };
        problems.push(format!(
            "{at}: give exactly one of eq, ne, in, exists (found {found})"
        ));
        return None;
    }
    let path = parse_path(at, &c.field, false, problems)?;
    let test = match (&c.eq, &c.ne, &c.one_of, c.exists) {
        (Some(v), ..) => Test::Eq(v.clone()),
        (_, Some(v), ..) => Test::Ne(v.clone()),
        (.., Some(list), _) => Test::In(list.clone()),
        (.., Some(b)) => Test::Exists(b),
        // `given` counted exactly one.
        (None, None, None, None) => return None,
    };
    Some(Check { path, test })
}

fn compile_refs(
    at: &str,
    refs: &BTreeMap<String, String>,
    problems: &mut Vec<String>,
) -> Vec<(FieldPath, String)> {
    let mut out = Vec::new();
    for (path, ref_type) in refs {
        let Some(path) = parse_path(at, path, false, problems) else {
            continue;
        };
        if !is_kind_name(ref_type) {
            problems.push(format!(
                "{at} {:?}: the type {ref_type:?} is not like \"Catalog.Контрагенты\" (Kind.Name)",
                path.text
            ));
            continue;
        }
        out.push((path, ref_type.clone()));
    }
    out
}

fn compile_values(
    at: &str,
    values: &BTreeMap<String, BTreeMap<String, Value>>,
    problems: &mut Vec<String>,
) -> Vec<(FieldPath, HashMap<String, Value>)> {
    let mut out = Vec::new();
    for (path, map) in values {
        if let Some(path) = parse_path(at, path, false, problems) {
            let map = map.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            out.push((path, map));
        }
    }
    out
}

/// `set` and `defaults`: path → value, the path ending in a name.
fn compile_writes(
    at: &str,
    writes: &BTreeMap<String, Value>,
    problems: &mut Vec<String>,
) -> Vec<(FieldPath, Value)> {
    let mut out = Vec::new();
    for (path, value) in writes {
        if let Some(path) = parse_path(at, path, true, problems) {
            out.push((path, value.clone()));
        }
    }
    out
}

fn compile_key(at: &str, key: Option<&String>, problems: &mut Vec<String>) -> Option<String> {
    let key = key?;
    if key.is_empty() || key.contains('.') || key.contains('[') {
        problems.push(format!(
            "{at}: {key:?} must be one top-level field name, like \"ИНН\""
        ));
        return None;
    }
    Some(key.clone())
}

fn compile_drop(at: &str, drop: &[String], problems: &mut Vec<String>) -> Vec<FieldPath> {
    drop.iter()
        .filter_map(|path| parse_path(at, path, true, problems))
        .collect()
}

/// The names to keep, with the first names of the paths `set` and `defaults` write to.
fn compile_keep<'a>(
    at: &str,
    keep: &[String],
    written: impl Iterator<Item = &'a FieldPath>,
    problems: &mut Vec<String>,
) -> HashSet<String> {
    let mut names = HashSet::new();
    for name in keep {
        if name.is_empty() || name.contains(['.', '[', ']']) {
            problems.push(format!(
                "{at} {name:?}: keep takes top-level field names, not paths"
            ));
        } else {
            names.insert(name.clone());
        }
    }
    for path in written {
        names.insert(path.segments[0].name.clone());
    }
    names
}

/// Renames, deepest first (then by path), each with its new last name.
fn compile_fields(
    at: &str,
    fields: &BTreeMap<String, String>,
    problems: &mut Vec<String>,
) -> Vec<(FieldPath, String)> {
    let mut out = Vec::new();
    for (path, target) in fields {
        let Some(path) = parse_path(at, path, true, problems) else {
            continue;
        };
        match new_field_name(&path, target) {
            Ok(name) => out.push((path, name)),
            Err(e) => problems.push(format!("{at} {:?}: {e}", path.text)),
        }
    }
    out.sort_by(|(a, _), (b, _)| b.depth().cmp(&a.depth()).then(a.text.cmp(&b.text)));
    out
}

/// JSON equality, except that numbers compare by value when either is a float.
fn json_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) if x.is_f64() || y.is_f64() => {
            x.as_f64().is_some() && x.as_f64() == y.as_f64()
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(a, b)| json_eq(a, b))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, a)| y.get(k).is_some_and(|b| json_eq(a, b)))
        }
        _ => a == b,
    }
}

/// A value as a value map matches it: strings as they are, numbers and booleans as JSON.
pub(super) fn value_text(v: &Value) -> Option<Cow<'_, str>> {
    match v {
        Value::String(s) => Some(Cow::Borrowed(s)),
        Value::Number(n) => Some(Cow::Owned(n.to_string())),
        Value::Bool(b) => Some(Cow::Borrowed(if *b { "true" } else { "false" })),
        _ => None,
    }
}

/// JSON text cut to a length fit for a message.
fn short_json(v: &Value) -> String {
    const MAX: usize = 80;
    let text = v.to_string();
    match text.char_indices().nth(MAX) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text,
    }
}

/// The rules for a type name a change is delivered under (as `model` checks a change's type).
pub(super) fn check_type_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("must not be empty".into());
    }
    if name.chars().any(char::is_whitespace) {
        return Err(format!("{name:?} contains whitespace"));
    }
    if name.contains(['*', '#']) {
        return Err(format!("{name:?} contains a wildcard character (* or #)"));
    }
    if name.len() > MAX_TYPE_BYTES {
        return Err(format!(
            "{name:?} is {} bytes long, at most {MAX_TYPE_BYTES} bytes of UTF-8 are allowed",
            name.len()
        ));
    }
    Ok(())
}

/// `Kind.Name`: two non-empty parts, and a valid type name.
fn is_kind_name(name: &str) -> bool {
    check_type_name(name).is_ok()
        && name
            .split_once('.')
            .is_some_and(|(kind, rest)| !kind.is_empty() && !rest.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transform::test_support::*;
    use crate::transform::{Mapping, Outcome};
    use serde_json::json;

    #[test]
    fn every_rule_kind_reshapes_the_order() {
        // (case, rules, type delivered, [(JSON pointer into data, expected value or absent)])
        type Case<'a> = (&'a str, &'a str, &'a str, Vec<(&'a str, Option<Value>)>);
        let cases: Vec<Case> = vec![
            (
                "rename the type",
                r#"rename = "order""#,
                "order",
                vec![("/Number", Some(json!("ЦБ-000315")))],
            ),
            (
                "keep top-level fields",
                r#"keep = ["Ref", "Number", "Товары"]"#,
                ORDER,
                vec![
                    ("/Ref", Some(json!("b5c6d7e8-8d4b-11ee-b9d1-0242ac120002"))),
                    ("/Number", Some(json!("ЦБ-000315"))),
                    ("/Товары/0/Цена", Some(json!(18450))),
                    ("/Posted", None),
                    ("/Контрагент", None),
                ],
            ),
            (
                "keep also keeps what set and defaults write",
                "keep = [\"Ref\"]\nset = { origin = \"1c\" }\ndefaults = { \"Менеджер\" = \"нет\" }",
                ORDER,
                vec![
                    ("/origin", Some(json!("1c"))),
                    ("/Менеджер", Some(json!("нет"))),
                    ("/Ref", Some(json!("b5c6d7e8-8d4b-11ee-b9d1-0242ac120002"))),
                    ("/Number", None),
                ],
            ),
            (
                "drop top-level and nested paths, a missing path is skipped",
                r#"drop = ["Комментарий", "Товары[].Сумма", "Нет.Такого", "Основание.#type"]"#,
                ORDER,
                vec![
                    ("/Комментарий", None),
                    ("/Товары/0/Сумма", None),
                    ("/Товары/1/Сумма", None),
                    ("/Товары/1/Цена", Some(json!(2460))),
                    ("/Основание", Some(json!({"#value": OFFER}))),
                    ("/Нет", None),
                ],
            ),
            (
                "rename a nested field by path",
                r#"fields = { "Товары[].Номенклатура" = "Товары[].product" }"#,
                ORDER,
                vec![
                    ("/Товары/0/product", Some(json!(NOMENCLATURE_1))),
                    ("/Товары/1/product", Some(json!(NOMENCLATURE_2))),
                    ("/Товары/0/Номенклатура", None),
                    ("/Товары/0/Количество", Some(json!(2))),
                ],
            ),
            (
                "rename by bare names, a row field and its table together",
                r#"fields = { "Number" = "номер", "Товары[].Номенклатура" = "product", "Товары" = "goods", "Нет" = "no" }"#,
                ORDER,
                vec![
                    ("/номер", Some(json!("ЦБ-000315"))),
                    ("/Number", None),
                    ("/goods/1/product", Some(json!(NOMENCLATURE_2))),
                    ("/Товары", None),
                    ("/no", None),
                ],
            ),
            (
                "rename over an existing field replaces it",
                r#"fields = { "Number" = "Date" }"#,
                ORDER,
                vec![("/Date", Some(json!("ЦБ-000315"))), ("/Number", None)],
            ),
            (
                "set constants, creating objects but not rows",
                r#"set = { origin = "1c", Posted = false, "Товары[].Склад" = "main", "Доставка.Способ" = "курьер", "Строки[].x" = 1 }"#,
                ORDER,
                vec![
                    ("/origin", Some(json!("1c"))),
                    ("/Posted", Some(json!(false))),
                    ("/Товары/0/Склад", Some(json!("main"))),
                    ("/Товары/1/Склад", Some(json!("main"))),
                    ("/Доставка", Some(json!({"Способ": "курьер"}))),
                    ("/Строки", None),
                ],
            ),
            (
                "map values by their text",
                r#"values = { "Статус" = { "КОтгрузке" = "ready" }, Posted = { "true" = "yes" }, "СуммаДокумента" = { "44280" = "big" }, "Товары[].СтавкаНДС" = { "НДС20" = 20 }, Number = { "other" = "x" }, "Основание" = { "x" = "y" } }"#,
                ORDER,
                vec![
                    ("/Статус", Some(json!("ready"))),
                    ("/Posted", Some(json!("yes"))),
                    ("/СуммаДокумента", Some(json!("big"))),
                    ("/Товары/0/СтавкаНДС", Some(json!(20))),
                    ("/Товары/1/СтавкаНДС", Some(json!(20))),
                    ("/Number", Some(json!("ЦБ-000315"))),
                    ("/Основание/#value", Some(json!(OFFER))),
                ],
            ),
            (
                "defaults fill missing fields only",
                r#"defaults = { "Комментарий" = "нет", "Менеджер" = "nobody", "Товары[].Скидка" = 0, "Товары[].Цена" = 1, "Доставка.Адрес" = "самовывоз" }"#,
                ORDER,
                vec![
                    ("/Комментарий", Some(json!(""))),
                    ("/Менеджер", Some(json!("nobody"))),
                    ("/Товары/0/Скидка", Some(json!(0))),
                    ("/Товары/1/Скидка", Some(json!(0))),
                    ("/Товары/0/Цена", Some(json!(18450))),
                    ("/Доставка/Адрес", Some(json!("самовывоз"))),
                ],
            ),
            (
                "value maps and set run before renames, on source names",
                "values = { \"Статус\" = { \"КОтгрузке\" = \"ready\" } }\nset = { \"Товары[].Склад\" = \"main\" }\nfields = { \"Статус\" = \"status\", \"Товары[].Склад\" = \"warehouse\" }",
                ORDER,
                vec![
                    ("/status", Some(json!("ready"))),
                    ("/Статус", None),
                    ("/Товары/0/warehouse", Some(json!("main"))),
                ],
            ),
            (
                "drop runs before keep and after set",
                "set = { \"Товары[].Склад\" = \"main\" }\ndrop = [\"Товары[].Склад\", \"Number\"]\nkeep = [\"Number\", \"Товары\"]",
                ORDER,
                vec![
                    ("/Товары/0/Склад", None),
                    ("/Number", None),
                    ("/Товары/0/Цена", Some(json!(18450))),
                    ("/Posted", None),
                ],
            ),
        ];
        for (case, rules, kind, checks) in cases {
            let change =
                delivered(order_rules(rules).apply(load("document-order.json"), &no_remap()));
            assert_eq!(change.kind, kind, "{case}: type");
            assert_eq!(
                change.reference, "b5c6d7e8-8d4b-11ee-b9d1-0242ac120002",
                "{case}: ref"
            );
            let data = change.data.as_ref().unwrap();
            for (pointer, want) in checks {
                assert_eq!(
                    data.pointer(pointer),
                    want.as_ref(),
                    "{case}: {pointer} in {data:#}"
                );
            }
        }
    }

    #[test]
    fn defaults_fill_nulls_and_leave_non_objects_and_missing_rows_alone() {
        let compiled = compile(
            r#"[types."Catalog.Склады"]
defaults = { "Адрес" = "нет", "Строки[].Скидка" = 0, "Шапка.Поле" = 1, "Доп.Город" = "Москва", "Пусто.Поле" = 2 }
set = { "Шапка.Другое" = 3 }"#,
        );
        let change = plain(
            "Catalog.Склады",
            "r1",
            json!({"Адрес": null, "Строки": [], "Шапка": "строка", "Пусто": null}),
        );
        let data = delivered(compiled.apply(change, &no_remap())).data.unwrap();
        assert_eq!(
            data,
            json!({"Адрес": "нет", "Строки": [], "Шапка": "строка", "Доп": {"Город": "Москва"}, "Пусто": {"Поле": 2}})
        );
    }

    #[test]
    fn filters_pass_or_name_the_failing_condition() {
        // (filter, on the posted order?, None = delivered / Some(part of the reason))
        let cases: &[(&str, bool, Option<&str>)] = &[
            (r#"[{ field = "Posted", eq = true }]"#, true, None),
            (
                r#"[{ field = "Posted", eq = true }]"#,
                false,
                Some("filter Posted eq true is not met: Posted is false"),
            ),
            (r#"[{ field = "Статус", ne = "Закрыт" }]"#, true, None),
            (
                r#"[{ field = "Статус", ne = "КОтгрузке" }]"#,
                true,
                Some(r#"filter Статус ne "КОтгрузке" is not met: Статус is "КОтгрузке""#),
            ),
            (r#"[{ field = "Нет", ne = 1 }]"#, true, None),
            (
                r#"[{ field = "Склад", in = ["d7e8f9a0-8d4b-11ee-b9d1-0242ac120002", "x"] }]"#,
                true,
                None,
            ),
            (
                r#"[{ field = "Склад", in = ["x", "y"] }]"#,
                true,
                Some(r#"filter Склад in ["x","y"] is not met"#),
            ),
            (r#"[{ field = "Основание", exists = true }]"#, true, None),
            (r#"[{ field = "Комментарий", exists = true }]"#, true, None),
            (
                r#"[{ field = "Нет", exists = true }]"#,
                true,
                Some("filter Нет exists true is not met: Нет is absent"),
            ),
            (r#"[{ field = "Нет", exists = false }]"#, true, None),
            (
                r#"[{ field = "Posted", exists = false }]"#,
                true,
                Some("Posted exists false"),
            ),
            (
                r#"[{ field = "СуммаДокумента", eq = 44280.0 }]"#,
                true,
                None,
            ),
            (
                r#"[{ field = "Основание.#value", eq = "e8f9a0b1-8d4b-11ee-b9d1-0242ac120002" }]"#,
                true,
                None,
            ),
            (
                r#"[{ field = "Товары[].Номенклатура", eq = "f9a0b1c2-8d4b-11ee-b9d1-0242ac120002" }]"#,
                true,
                None,
            ),
            (
                r#"[{ field = "Товары[].Количество", in = [5, 7] }]"#,
                true,
                Some("Товары[].Количество is [2,3]"),
            ),
            (
                r#"[{ field = "Posted", eq = true }, { field = "Статус", eq = "Закрыт" }]"#,
                true,
                Some(r#"filter Статус eq "Закрыт""#),
            ),
            (
                r#"[{ field = "Posted", eq = true }, { field = "Статус", eq = "Закрыт" }]"#,
                false,
                Some("filter Posted eq true"),
            ),
        ];
        for (filter, posted, want) in cases {
            let compiled = order_rules(&format!("filter = {filter}"));
            let change = if *posted {
                load("document-order.json")
            } else {
                unposted_order()
            };
            match (compiled.apply(change.clone(), &no_remap()), want) {
                (Outcome::Deliver(out), None) => assert_eq!(out, change, "{filter}"),
                (Outcome::Filtered(reason), Some(needle)) => {
                    assert!(
                        reason.contains(needle),
                        "{filter}: {reason:?} lacks {needle:?}"
                    )
                }
                (other, want) => {
                    panic!("{filter} (posted: {posted}): got {other:?}, wanted {want:?}")
                }
            }
        }
    }

    #[test]
    fn filters_see_the_source_data() {
        let compiled = order_rules(
            "filter = [{ field = \"Статус\", eq = \"КОтгрузке\" }]\nvalues = { \"Статус\" = { \"КОтгрузке\" = \"ready\" } }\nfields = { \"Статус\" = \"status\" }",
        );
        let data = delivered(compiled.apply(load("document-order.json"), &no_remap()))
            .data
            .unwrap();
        assert_eq!(data["status"], "ready");
    }

    #[test]
    fn new_reports_every_problem_naming_type_and_path() {
        let order = format!("[types.\"{ORDER}\"]");
        // (mapping, part of the one problem expected)
        let cases: Vec<(String, &str)> = vec![
            (
                format!("{order}\nfields = {{ \"Товары[].Номенклатура\" = \"Шапка.product\" }}"),
                r#"types."Document.ЗаказКлиента".fields "Товары[].Номенклатура": the new name "Шапка.product" must be a bare name or a path under the same parent "Товары[]""#,
            ),
            (
                format!("{order}\nfields = {{ \"Товары[].Номенклатура\" = \"Товары.product\" }}"),
                "a rename can't move a field to another object",
            ),
            (
                format!("{order}\nfields = {{ \"Number\" = \"Шапка.Номер\" }}"),
                r#"fields "Number": the new name "Шапка.Номер" must be a bare name"#,
            ),
            (format!("{order}\nfields = {{ \"Number\" = \"\" }}"), "the new name is empty"),
            (format!("{order}\nfields = {{ \"Number\" = \"n[]\" }}"), "without []"),
            (format!("{order}\nfields = {{ \"Товары[]\" = \"goods\" }}"), "must end in a field name"),
            (
                format!("{order}\ndrop = [\"\"]"),
                r#"types."Document.ЗаказКлиента".drop "": the path is empty"#,
            ),
            (
                format!("{order}\ndrop = [\"Товары..Сумма\"]"),
                r#"drop "Товары..Сумма": a name in the path is empty"#,
            ),
            (format!("{order}\ndrop = [\"Товары[].\"]"), "a name in the path is empty"),
            (format!("{order}\ndrop = [\"[].x\"]"), "a name in the path is empty"),
            (format!("{order}\ndrop = [\"Тов[ары\"]"), "brackets are allowed only as []"),
            (format!("{order}\nset = {{ \"Товары[]\" = 1 }}"), r#"set "Товары[]": the path must end in a field name"#),
            (format!("{order}\ndefaults = {{ \".x\" = 1 }}"), r#"defaults ".x""#),
            (format!("{order}\nvalues = {{ \"\" = {{ a = 1 }} }}"), r#"values "": the path is empty"#),
            (format!("{order}\nrename = \"\""), r#"types."Document.ЗаказКлиента".rename: must not be empty"#),
            (format!("{order}\nrename = \"Заказ клиента\""), "rename: \"Заказ клиента\" contains whitespace"),
            (format!("{order}\nrename = \"Заказ.*\""), "wildcard"),
            (
                format!("{order}\nrefs = {{ \"Контрагент\" = \"Контрагенты\" }}"),
                r#"refs "Контрагент": the type "Контрагенты" is not like "Catalog.Контрагенты" (Kind.Name)"#,
            ),
            (format!("{order}\nrefs = {{ \"Контрагент\" = \"Catalog.\" }}"), "(Kind.Name)"),
            (format!("{order}\nrefs = {{ \"Контрагент\" = \".Контрагенты\" }}"), "(Kind.Name)"),
            (format!("{order}\nrefs = {{ \"\" = \"Catalog.X\" }}"), r#"refs "": the path is empty"#),
            (
                format!("{order}\nfilter = [{{ field = \"Posted\" }}]"),
                r#"types."Document.ЗаказКлиента".filter[0] (field "Posted"): give exactly one of eq, ne, in, exists (found none)"#,
            ),
            (
                format!("{order}\nfilter = [{{ field = \"Posted\", eq = true }}, {{ field = \"Posted\", eq = true, exists = true }}]"),
                "filter[1] (field \"Posted\"): give exactly one of eq, ne, in, exists (found eq and exists)",
            ),
            (format!("{order}\nfilter = [{{ field = \"\", ne = 1 }}]"), "the path is empty"),
            (format!("{order}\nkeep = [\"Товары.Сумма\"]"), r#"keep "Товары.Сумма": keep takes top-level field names"#),
            (format!("{order}\nkeep = [\"\"]"), "keep takes top-level field names"),
            ("script = 'let x = ;'".into(), "script: syntax error at line 1"),
            (
                "script = '''\nchange.data.a = 1;\nlet = 2;\nchange\n'''".into(),
                "script: syntax error at line 2",
            ),
            ("script = 'import \"x\" as y; change'".into(), "script: syntax error"),
            ("script = '  '".into(), "script: is empty"),
            (
                "script = 'change'\nscript_file = 'x.rhai'".into(),
                "script and script_file are both set",
            ),
            ("script_file = 'нет-такого.rhai'".into(), r#"script_file "нет-такого.rhai": can't read"#),
        ];
        for (toml_text, needle) in cases {
            let problems = problems(&toml_text);
            assert_eq!(problems.len(), 1, "{toml_text}\n{problems:#?}");
            assert!(
                problems[0].contains(needle),
                "{toml_text}\n{:?} lacks {needle:?}",
                problems[0]
            );
        }

        // Every problem at once.
        let all = problems(&format!(
            "script = 'let = ;'\n{order}\nrename = \"\"\ndrop = [\"\"]\nfilter = [{{ field = \"x\" }}]\n[types.\"*\"]\nrefs = {{ a = \"b\" }}"
        ));
        assert_eq!(all.len(), 5, "{all:#?}");
        assert!(
            all.iter().any(|p| p.starts_with("types.\"*\".refs \"a\"")),
            "{all:#?}"
        );

        // Unknown fields are serde's.
        let unknown =
            toml::from_str::<Mapping>("[types.\"Catalog.X\"]\nrenam = \"y\"").unwrap_err();
        assert!(
            unknown.to_string().contains("unknown field `renam`"),
            "{unknown}"
        );
    }
}
