//! Transforming a change for its target, pure: per-route mapping rules (rename/skip types,
//! keep/drop/rename fields by path, constants, value maps, defaults, filters), a sandboxed
//! Rhai script hook, reference analysis (1C XDTO typed references and declared reference
//! fields), GUID remapping through a given table, and the 1C XDTO output form.
//!
//! No I/O once compiled: the remap table and anything else from the store are passed in;
//! only [`Compiled::new`] reads a `script_file`.
//!
//! Paths: dot-separated field names, `[]` after a name walks every element of an array:
//! `Товары[].Номенклатура` is the `Номенклатура` of every row of `Товары`. A path that does
//! not exist in a change is silently skipped (by drop, rename, value maps and refs; a filter
//! sees it as absent). Setting or defaulting a path creates missing (absent or null)
//! intermediate objects, but never rows: under `[]` only the existing rows are touched, and
//! an intermediate holding something other than an object is left alone. The paths of `set`,
//! `defaults`, `drop` and `fields` must end in a name, not in `[]`; those of `filter`,
//! `values` and `refs` may (then every element of the array is a value).

use crate::model::{Op, MAX_TYPE_BYTES};
use rhai::{Dynamic, Engine, EvalAltResult, AST};
use serde::Deserialize;
use serde_json::{Map, Value};
use std::borrow::Cow;
use std::cell::Cell;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::Path;
use std::time::{Duration, Instant};

/// A route's mapping, as written in `[route.mapping]` or in the file `mapping_file = "..."` names.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mapping {
    /// Rules per source type; the key `"*"` applies to types without an entry of their own.
    #[serde(default)]
    pub types: BTreeMap<String, TypeRules>,
    /// A Rhai script run after the rules on every change of the route (inline source).
    /// It sees the variable `change` (a map: `id`, `type`, `ref`, `op` = "upsert" or
    /// "delete", `data` = a map or `()`, `source`, `seq`) and returns the change to deliver
    /// (a map; keys it leaves out keep their old values) or `()` to drop it (recorded as
    /// filtered). An error, or running past 1,000,000 operations or 100 ms, fails the change
    /// (retry, then dead letter) with the script's message. Scripts can't read files, import
    /// modules or sleep.
    pub script: Option<String>,
    /// A Rhai script file, relative to the config file's folder (instead of `script`).
    pub script_file: Option<String>,
}

/// What to do with the changes of one type.
///
/// The rules run in this order: `skip`, `filter` (on the source data), the remap of
/// references, `values`, `defaults`, `set`, `drop`, `keep`, `fields`, `rename`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TypeRules {
    /// Deliver the change under this type instead (no whitespace, `*` or `#`).
    pub rename: Option<String>,
    /// Never deliver this type (recorded as filtered); deletions included.
    #[serde(default)]
    pub skip: bool,
    /// Keep only these top-level fields of `data` (names, not paths), by their source names.
    /// The fields `set` and `defaults` write to (the first name of their paths) are kept too.
    pub keep: Option<Vec<String>>,
    /// Remove these paths from `data`.
    #[serde(default)]
    pub drop: Vec<String>,
    /// Rename fields: path → new name (or a path with the same parent, whose last name is used).
    /// The field keeps its place in its object; a field already there under the new name is
    /// replaced. Deeper paths are renamed first, so `Товары[].Номенклатура` and `Товары`
    /// can both be renamed.
    #[serde(default)]
    pub fields: BTreeMap<String, String>,
    /// Set constants: path → value.
    #[serde(default)]
    pub set: BTreeMap<String, Value>,
    /// Map values: path → { from (as text) → to }. Values not listed stay as they are.
    /// A string matches as it is, a number or a boolean by its JSON text (`"44280"`,
    /// `"true"`); null, objects and arrays never match.
    #[serde(default)]
    pub values: BTreeMap<String, BTreeMap<String, Value>>,
    /// Values for missing (absent or null) paths.
    #[serde(default)]
    pub defaults: BTreeMap<String, Value>,
    /// Fields holding references: path → the referenced type (e.g. `Catalog.Контрагенты`),
    /// for fields that carry a plain GUID rather than a typed XDTO reference.
    #[serde(default)]
    pub refs: BTreeMap<String, String>,
    /// Deliver only upserts whose data matches every condition (deletions always pass).
    #[serde(default)]
    pub filter: Vec<Condition>,
    /// A top-level field whose value identifies the object in every base (`ИНН`, `Code`):
    /// with the target's `remap = true`, an object whose ref the target doesn't know yet
    /// takes the target ref learned for another object with the same key value (the key
    /// match rule), and references to it are rewritten from then on.
    pub key: Option<String>,
}

/// A condition on a path of the change's data; exactly one of `eq`, `ne`, `in`, `exists`.
///
/// A path through `[]` gives one value per row: `eq`, `in` and `exists = true` hold when
/// some row matches, `ne` and `exists = false` when none does. Numbers compare by value
/// (`1` equals `1.0`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Condition {
    pub field: String,
    /// Holds when the value equals this JSON value.
    pub eq: Option<Value>,
    /// Holds when the value is not equal to this (an absent field is not equal).
    pub ne: Option<Value>,
    /// Holds when the value equals one of these.
    #[serde(rename = "in")]
    pub one_of: Option<Vec<Value>>,
    /// `true`: holds when the field is present and not null; `false`: when it is not.
    pub exists: Option<bool>,
}

/// A change on its way to a target, owned so rules can reshape it.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    pub id: String,
    pub kind: String,
    pub reference: String,
    pub op: Op,
    pub data: Option<Value>,
    pub source: String,
    pub seq: i64,
}

/// What the transform decided.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Deliver(Change),
    /// Not for this target; the reason names the rule (or the script).
    Filtered(String),
    /// The change can't be transformed now (a script error): retry, then dead-letter.
    Failed(String),
}

/// A referenced object: its type and its ref (a GUID).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Reference {
    pub kind: String,
    pub reference: String,
}

/// The remap table for one target: (type, source ref) → target ref.
pub type Remap = HashMap<(String, String), String>;

/// The empty reference of 1C.
const ZERO_GUID: &str = "00000000-0000-0000-0000-000000000000";
/// A script's budget of Rhai operations per change.
const SCRIPT_MAX_OPERATIONS: u64 = 1_000_000;
/// A script's budget of wall time per change.
const SCRIPT_TIME_LIMIT: Duration = Duration::from_millis(100);
/// The wall clock is looked at once per this many operations.
const SCRIPT_CLOCK_EVERY: u64 = 1024;

/// A mapping checked and ready to run (script compiled once).
pub struct Compiled {
    /// Rules per exact source type.
    types: HashMap<String, Rules>,
    /// The `"*"` rules.
    fallback: Option<Rules>,
    script: Option<Script>,
}

impl Compiled {
    /// Checks a mapping and compiles its script; every problem is returned, one sentence
    /// each, naming the type and path (for `lxbridge validate`). `base_dir` resolves
    /// `script_file`.
    pub fn new(mapping: &Mapping, base_dir: &Path) -> Result<Compiled, Vec<String>> {
        let mut problems = Vec::new();
        let mut types = HashMap::new();
        let mut fallback = None;
        for (kind, rules) in &mapping.types {
            let rules = Rules::compile(kind, rules, &mut problems);
            if kind == "*" {
                fallback = Some(rules);
            } else {
                types.insert(kind.clone(), rules);
            }
        }
        let script = Script::load(mapping, base_dir, &mut problems);
        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(Compiled {
            types,
            fallback,
            script,
        })
    }

    /// No rules and no script: changes pass unchanged (references still found).
    pub fn identity() -> Compiled {
        Compiled {
            types: HashMap::new(),
            fallback: None,
            script: None,
        }
    }

    /// True when there are no rules and no script (the fast path may skip `apply`).
    /// Type entries without any rule in them don't count; declared `refs` do (they are
    /// remapped by `apply`).
    pub fn is_identity(&self) -> bool {
        self.script.is_none()
            && self.fallback.as_ref().is_none_or(Rules::is_noop)
            && self.types.values().all(Rules::is_noop)
    }

    /// Every reference inside the change's data: 1C XDTO typed references
    /// (`{"#type": "jcfg:CatalogRef.X", "#value": "<guid>"}` anywhere, nested rows too) and
    /// the declared `refs` of its source type. The all-zero GUID (an empty reference) and the
    /// change's own ref are left out. Sorted, without repeats.
    ///
    /// A typed reference is an object of exactly `#type` and `#value` (a string), whose type
    /// is `jcfg:<Kind>Ref.<Name>` for a reference kind (`CatalogRef` → `Catalog`, …);
    /// enumeration values (`EnumRef`) are not objects that get delivered and are left out.
    /// A declared reference is a non-empty string at a declared path. The rules are looked
    /// up by `change.kind`, so call this on the change as the source sent it.
    pub fn references(&self, change: &Change) -> Vec<Reference> {
        let Some(data) = &change.data else {
            return Vec::new();
        };
        let mut found = BTreeSet::new();
        let mut add = |kind: Cow<'_, str>, reference: &str| {
            if reference == ZERO_GUID
                || (reference == change.reference && kind.as_ref() == change.kind)
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
        if let Some(rules) = self.rules_for(&change.kind) {
            for (path, kind) in &rules.refs {
                visit_values(data, &path.segments, &mut |v| {
                    if let Value::String(s) = v {
                        if !s.is_empty() {
                            add(Cow::Borrowed(kind), s);
                        }
                    }
                });
            }
        }
        found.into_iter().collect()
    }

    /// Applies, in order: skip and filter (on the source data), the remap of references
    /// (typed and declared, through `remap`), value maps, defaults, constants, drop and keep,
    /// field renames, the type rename, then the script.
    ///
    /// The rules are those of the change's source type, or the `"*"` rules when it has none.
    /// A deletion honours `skip` but passes every filter; the data rules only touch data that
    /// is there. A remapped typed reference gets the target's ref as its `#value`, a declared
    /// one is replaced by it; the change's own `ref` is not rewritten.
    pub fn apply(&self, mut change: Change, remap: &Remap) -> Outcome {
        let rules = self.rules_for(&change.kind);
        if let Some(rules) = rules {
            if rules.skip {
                return Outcome::Filtered(format!(
                    "type {} is skipped by the route mapping",
                    change.kind
                ));
            }
            if change.op != Op::Delete {
                if let Err(reason) = rules.check_filter(change.data.as_ref()) {
                    return Outcome::Filtered(reason);
                }
            }
        }
        if let Some(data) = change.data.as_mut() {
            if !remap.is_empty() {
                remap_typed_refs(data, remap);
                if let Some(rules) = rules {
                    rules.remap_declared(data, remap);
                }
            }
            if let Some(rules) = rules {
                rules.reshape(data);
            }
        }
        if let Some(name) = rules.and_then(|r| r.rename.as_ref()) {
            change.kind.clone_from(name);
        }
        match &self.script {
            Some(script) => script.run(change),
            None => Outcome::Deliver(change),
        }
    }

    /// The key match value of a change (`"ИНН=7701234567"`), when its type's rules name a
    /// `key` and its data holds a plain value there.
    pub fn key_of(&self, change: &Change) -> Option<String> {
        let field = self.key_field(&change.kind)?;
        let value = change.data.as_ref()?.get(field)?;
        value_text(value).map(|text| format!("{field}={text}"))
    }

    /// The key match field of a type, if its rules name one.
    pub fn key_field(&self, kind: &str) -> Option<&str> {
        self.rules_for(kind)?.key.as_deref()
    }

    fn rules_for(&self, kind: &str) -> Option<&Rules> {
        self.types.get(kind).or(self.fallback.as_ref())
    }
}

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
fn remap_typed_refs(v: &mut Value, remap: &Remap) {
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

/// One name of a path; `each` when it was written `name[]`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Segment {
    name: String,
    each: bool,
}

/// A parsed path; `segments` is never empty.
#[derive(Debug, Clone)]
struct FieldPath {
    text: String,
    segments: Vec<Segment>,
}

impl FieldPath {
    fn parse(text: &str) -> Result<FieldPath, String> {
        if text.is_empty() {
            return Err("the path is empty".into());
        }
        let mut segments = Vec::new();
        for part in text.split('.') {
            let (name, each) = match part.strip_suffix("[]") {
                Some(name) => (name, true),
                None => (part, false),
            };
            if name.is_empty() {
                return Err("a name in the path is empty".into());
            }
            if name.contains(['[', ']']) {
                return Err("brackets are allowed only as [] right after a name".into());
            }
            segments.push(Segment {
                name: name.to_string(),
                each,
            });
        }
        Ok(FieldPath {
            text: text.to_string(),
            segments,
        })
    }

    fn parent(&self) -> &[Segment] {
        &self.segments[..self.segments.len() - 1]
    }

    fn last(&self) -> &Segment {
        &self.segments[self.segments.len() - 1]
    }

    fn depth(&self) -> usize {
        self.segments.len()
    }
}

/// Calls `f` with every value at `segments` below `v`.
fn visit_values<'a>(v: &'a Value, segments: &[Segment], f: &mut impl FnMut(&'a Value)) {
    let Some((seg, rest)) = segments.split_first() else {
        f(v);
        return;
    };
    let Some(slot) = v.as_object().and_then(|obj| obj.get(&seg.name)) else {
        return;
    };
    if seg.each {
        if let Value::Array(items) = slot {
            items.iter().for_each(|item| visit_values(item, rest, f));
        }
    } else {
        visit_values(slot, rest, f);
    }
}

/// Calls `f` with every value at `segments` below `v`, mutably.
fn visit_values_mut(v: &mut Value, segments: &[Segment], f: &mut impl FnMut(&mut Value)) {
    let Some((seg, rest)) = segments.split_first() else {
        f(v);
        return;
    };
    let Some(slot) = v.as_object_mut().and_then(|obj| obj.get_mut(&seg.name)) else {
        return;
    };
    if seg.each {
        if let Value::Array(items) = slot {
            items
                .iter_mut()
                .for_each(|item| visit_values_mut(item, rest, f));
        }
    } else {
        visit_values_mut(slot, rest, f);
    }
}

/// Calls `f` with every object at `segments` below `v` (the parents of a path's last name).
/// With `create`, missing (absent or null) objects on the way are created, except under `[]`.
fn visit_objects_mut(
    v: &mut Value,
    segments: &[Segment],
    create: bool,
    f: &mut impl FnMut(&mut Map<String, Value>),
) {
    let Value::Object(obj) = v else {
        return;
    };
    let Some((seg, rest)) = segments.split_first() else {
        f(obj);
        return;
    };
    if create && !seg.each && obj.get(&seg.name).is_none_or(Value::is_null) {
        obj.insert(seg.name.clone(), Value::Object(Map::new()));
    }
    let Some(slot) = obj.get_mut(&seg.name) else {
        return;
    };
    if seg.each {
        if let Value::Array(items) = slot {
            items
                .iter_mut()
                .for_each(|item| visit_objects_mut(item, rest, create, f));
        }
    } else {
        visit_objects_mut(slot, rest, create, f);
    }
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
fn value_text(v: &Value) -> Option<Cow<'_, str>> {
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
struct Rules {
    rename: Option<String>,
    skip: bool,
    filter: Vec<Check>,
    refs: Vec<(FieldPath, String)>,
    values: Vec<(FieldPath, HashMap<String, Value>)>,
    defaults: Vec<(FieldPath, Value)>,
    set: Vec<(FieldPath, Value)>,
    drop: Vec<FieldPath>,
    /// With the first names of the `set` and `defaults` paths added.
    keep: Option<HashSet<String>>,
    /// Deepest first; the new last name.
    fields: Vec<(FieldPath, String)>,
    /// The key match field (a top-level name).
    key: Option<String>,
}

impl Rules {
    fn compile(kind: &str, rules: &TypeRules, problems: &mut Vec<String>) -> Rules {
        let at = |section: &str| format!("types.{kind:?}.{section}");
        let mut out = Rules {
            skip: rules.skip,
            ..Rules::default()
        };

        if let Some(name) = &rules.rename {
            match check_type_name(name) {
                Ok(()) => out.rename = Some(name.clone()),
                Err(e) => problems.push(format!("{}: {e}", at("rename"))),
            }
        }

        for (i, c) in rules.filter.iter().enumerate() {
            let at = format!("{}[{i}] (field {:?})", at("filter"), c.field);
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
                continue;
            }
            let Some(path) = parse_path(&at, &c.field, false, problems) else {
                continue;
            };
            let test = match (&c.eq, &c.ne, &c.one_of, c.exists) {
                (Some(v), ..) => Test::Eq(v.clone()),
                (_, Some(v), ..) => Test::Ne(v.clone()),
                (.., Some(list), _) => Test::In(list.clone()),
                (.., Some(b)) => Test::Exists(b),
                // `given` counted exactly one.
                (None, None, None, None) => continue,
            };
            out.filter.push(Check { path, test });
        }

        for (path, ref_type) in &rules.refs {
            let at = at("refs");
            let Some(path) = parse_path(&at, path, false, problems) else {
                continue;
            };
            if !is_kind_name(ref_type) {
                problems.push(format!(
                    "{at} {:?}: the type {ref_type:?} is not like \"Catalog.Контрагенты\" (Kind.Name)",
                    path.text
                ));
                continue;
            }
            out.refs.push((path, ref_type.clone()));
        }

        for (path, map) in &rules.values {
            if let Some(path) = parse_path(&at("values"), path, false, problems) {
                let map = map.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
                out.values.push((path, map));
            }
        }
        for (path, value) in &rules.defaults {
            if let Some(path) = parse_path(&at("defaults"), path, true, problems) {
                out.defaults.push((path, value.clone()));
            }
        }
        if let Some(key) = &rules.key {
            if key.is_empty() || key.contains('.') || key.contains('[') {
                problems.push(format!(
                    "{}: {key:?} must be one top-level field name, like \"ИНН\"",
                    at("key")
                ));
            } else {
                out.key = Some(key.clone());
            }
        }
        for (path, value) in &rules.set {
            if let Some(path) = parse_path(&at("set"), path, true, problems) {
                out.set.push((path, value.clone()));
            }
        }
        for path in &rules.drop {
            if let Some(path) = parse_path(&at("drop"), path, true, problems) {
                out.drop.push(path);
            }
        }

        if let Some(keep) = &rules.keep {
            let mut names = HashSet::new();
            for name in keep {
                if name.is_empty() || name.contains(['.', '[', ']']) {
                    problems.push(format!(
                        "{} {name:?}: keep takes top-level field names, not paths",
                        at("keep")
                    ));
                } else {
                    names.insert(name.clone());
                }
            }
            for (path, _) in out.set.iter().chain(&out.defaults) {
                names.insert(path.segments[0].name.clone());
            }
            out.keep = Some(names);
        }

        for (path, target) in &rules.fields {
            let at = at("fields");
            let Some(path) = parse_path(&at, path, true, problems) else {
                continue;
            };
            match new_field_name(&path, target) {
                Ok(name) => out.fields.push((path, name)),
                Err(e) => problems.push(format!("{at} {:?}: {e}", path.text)),
            }
        }
        out.fields
            .sort_by(|(a, _), (b, _)| b.depth().cmp(&a.depth()).then(a.text.cmp(&b.text)));
        out
    }

    fn is_noop(&self) -> bool {
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
    fn check_filter(&self, data: Option<&Value>) -> Result<(), String> {
        for check in &self.filter {
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

    /// Replaces the plain GUIDs at the declared reference paths that `remap` knows.
    fn remap_declared(&self, data: &mut Value, remap: &Remap) {
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
    fn reshape(&self, data: &mut Value) {
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

/// Parses a mapping path; `at` names where it was written. `field_end`: the path must end
/// in a name (it names a field to write, remove or rename), not in `[]`.
fn parse_path(
    at: &str,
    text: &str,
    field_end: bool,
    problems: &mut Vec<String>,
) -> Option<FieldPath> {
    match FieldPath::parse(text) {
        Err(e) => {
            problems.push(format!("{at} {text:?}: {e}"));
            None
        }
        Ok(path) if field_end && path.last().each => {
            problems.push(format!(
                "{at} {text:?}: the path must end in a field name, not in []"
            ));
            None
        }
        Ok(path) => Some(path),
    }
}

/// The new last name of a renamed field: `target` is a bare name, or a path with the same
/// parent as `path`.
fn new_field_name(path: &FieldPath, target: &str) -> Result<String, String> {
    let parent_text = || {
        let parent: Vec<String> = path
            .parent()
            .iter()
            .map(|s| format!("{}{}", s.name, if s.each { "[]" } else { "" }))
            .collect();
        parent.join(".")
    };
    if target.is_empty() {
        return Err("the new name is empty".into());
    }
    if !target.contains('.') {
        if target.contains(['[', ']']) {
            return Err(format!(
                "the new name {target:?} must be a field name, without []"
            ));
        }
        return Ok(target.to_string());
    }
    match FieldPath::parse(target) {
        Ok(new) if new.parent() == path.parent() && !new.last().each => {
            Ok(new.last().name.clone())
        }
        _ if path.parent().is_empty() => Err(format!(
            "the new name {target:?} must be a bare name: a rename can't move a field to another object"
        )),
        _ => Err(format!(
            "the new name {target:?} must be a bare name or a path under the same parent {:?}: a rename can't move a field to another object",
            parent_text()
        )),
    }
}

/// The rules for a type name a change is delivered under (as `model` checks a change's type).
fn check_type_name(name: &str) -> Result<(), String> {
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

thread_local! {
    /// When the script running on this thread must stop.
    static SCRIPT_DEADLINE: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// Sets this thread's script deadline for as long as it lives.
struct Deadline(Option<Instant>);

impl Deadline {
    fn start(limit: Duration) -> Deadline {
        Deadline(SCRIPT_DEADLINE.with(|d| d.replace(Some(Instant::now() + limit))))
    }
}

impl Drop for Deadline {
    fn drop(&mut self) {
        SCRIPT_DEADLINE.with(|d| d.set(self.0));
    }
}

/// A compiled route script and its sandboxed engine.
struct Script {
    engine: Engine,
    ast: AST,
}

impl Script {
    /// Reads and compiles the mapping's script, if it has one.
    fn load(mapping: &Mapping, base_dir: &Path, problems: &mut Vec<String>) -> Option<Script> {
        let (name, source) = match (&mapping.script, &mapping.script_file) {
            (None, None) => return None,
            (Some(_), Some(_)) => {
                problems.push("script and script_file are both set: give one of them".into());
                return None;
            }
            (Some(source), None) => ("script".to_string(), source.clone()),
            (None, Some(file)) => {
                let path = base_dir.join(file);
                match std::fs::read_to_string(&path) {
                    Ok(source) => (format!("script_file {file:?}"), source),
                    Err(e) => {
                        problems.push(format!(
                            "script_file {file:?}: can't read {}: {e}",
                            path.display()
                        ));
                        return None;
                    }
                }
            }
        };
        if source.trim().is_empty() {
            problems.push(format!(
                "{name}: is empty (it would drop every change; return `change` to keep it)"
            ));
            return None;
        }
        let engine = script_engine();
        match engine.compile(&source) {
            Ok(ast) => Some(Script { engine, ast }),
            Err(e) => {
                let pos = e.position();
                let at = match (pos.line(), pos.position()) {
                    (Some(line), Some(col)) => format!(" at line {line}, position {col}"),
                    (Some(line), None) => format!(" at line {line}"),
                    _ => String::new(),
                };
                problems.push(format!("{name}: syntax error{at}: {}", e.err_type()));
                None
            }
        }
    }

    /// Runs the script on a change: its result is the change to deliver, or `()` to drop it.
    fn run(&self, change: Change) -> Outcome {
        let input = match change_to_dynamic(&change) {
            Ok(input) => input,
            Err(e) => return Outcome::Failed(format!("script error: {e}")),
        };
        let mut scope = rhai::Scope::new();
        scope.push("change", input);
        let result = {
            let _deadline = Deadline::start(SCRIPT_TIME_LIMIT);
            self.engine
                .eval_ast_with_scope::<Dynamic>(&mut scope, &self.ast)
        };
        let result = match result {
            Ok(result) => result.flatten(),
            Err(e) => return Outcome::Failed(script_error(&e)),
        };
        if result.is_unit() {
            return Outcome::Filtered("the route script dropped it".into());
        }
        let type_name = result.type_name();
        match result.try_cast::<rhai::Map>() {
            Some(map) => match change_from_map(change, map) {
                Ok(change) => Outcome::Deliver(change),
                Err(e) => Outcome::Failed(format!("script error: {e}")),
            },
            None => Outcome::Failed(format!(
                "script error: the script returned {type_name}, not the change (a map) or () to drop it"
            )),
        }
    }
}

/// The engine scripts run in: standard library, no modules, no sleeping, printing to the
/// debug log, and limits on operations, time, nesting and sizes.
fn script_engine() -> Engine {
    let mut engine = Engine::new();
    engine
        .set_max_operations(SCRIPT_MAX_OPERATIONS)
        .set_max_call_levels(32)
        .set_max_expr_depths(64, 32)
        .set_max_string_size(1 << 20)
        .set_max_array_size(100_000)
        .set_max_map_size(100_000)
        // The interner is one lock shared by every delivery task.
        .set_max_strings_interned(0);
    engine.on_progress(|operations| {
        if operations % SCRIPT_CLOCK_EVERY != 0 {
            return None;
        }
        let deadline = SCRIPT_DEADLINE.with(Cell::get)?;
        (Instant::now() >= deadline).then_some(Dynamic::UNIT)
    });
    engine.on_print(|s| tracing::debug!(target: "lxbridge::script", "{s}"));
    engine.on_debug(|s, _, pos| tracing::debug!(target: "lxbridge::script", "{pos:?}: {s}"));
    // The standard `sleep` would block a delivery task past any limit.
    engine.register_fn("sleep", |_: rhai::INT| -> Result<(), Box<EvalAltResult>> {
        Err("sleep is not available in route scripts".into())
    });
    engine.register_fn(
        "sleep",
        |_: rhai::FLOAT| -> Result<(), Box<EvalAltResult>> {
            Err("sleep is not available in route scripts".into())
        },
    );
    engine
}

fn script_error(e: &EvalAltResult) -> String {
    match e {
        EvalAltResult::ErrorTerminated(..) => format!(
            "script error: ran longer than {} ms and was stopped",
            SCRIPT_TIME_LIMIT.as_millis()
        ),
        e => format!("script error: {e}"),
    }
}

/// The `change` a script sees.
fn change_to_dynamic(change: &Change) -> Result<Dynamic, String> {
    let data = match &change.data {
        None => Dynamic::UNIT,
        Some(data) => rhai::serde::to_dynamic(data).map_err(|e| format!("data: {e}"))?,
    };
    let op = match change.op {
        Op::Upsert => "upsert",
        Op::Delete => "delete",
    };
    let mut map = rhai::Map::new();
    map.insert("id".into(), change.id.clone().into());
    map.insert("type".into(), change.kind.clone().into());
    map.insert("ref".into(), change.reference.clone().into());
    map.insert("op".into(), op.into());
    map.insert("data".into(), data);
    map.insert("source".into(), change.source.clone().into());
    map.insert("seq".into(), Dynamic::from_int(change.seq));
    Ok(Dynamic::from_map(map))
}

/// The change a script returned; keys it left out keep `old`'s values, others are ignored.
fn change_from_map(old: Change, mut map: rhai::Map) -> Result<Change, String> {
    let mut text = |key: &str, old: String, non_empty: bool| -> Result<String, String> {
        let Some(v) = map.remove(key) else {
            return Ok(old);
        };
        let v = v.flatten();
        let type_name = v.type_name();
        match v.into_string() {
            Ok(s) if non_empty && s.is_empty() => {
                Err(format!("the returned change's {key} is empty"))
            }
            Ok(s) => Ok(s),
            Err(_) => Err(format!(
                "the returned change's {key} must be a string, not {type_name}"
            )),
        }
    };
    let id = text("id", old.id, true)?;
    let kind = text("type", old.kind, true)?;
    let reference = text("ref", old.reference, true)?;
    let source = text("source", old.source, false)?;
    let op = match text("op", String::new(), false)?.as_str() {
        "" => old.op,
        "upsert" => Op::Upsert,
        "delete" => Op::Delete,
        other => {
            return Err(format!(
                "the returned change's op is {other:?}, not \"upsert\" or \"delete\""
            ))
        }
    };
    if let Err(e) = check_type_name(&kind) {
        return Err(format!("the returned change's type: {e}"));
    }
    let seq = match map.remove("seq").map(Dynamic::flatten) {
        None => old.seq,
        Some(v) => v.as_int().map_err(|found| {
            format!("the returned change's seq must be an integer, not {found}")
        })?,
    };
    let data = match map.remove("data").map(Dynamic::flatten) {
        None => old.data,
        Some(v) if v.is_unit() => None,
        Some(v) if v.is_map() => Some(
            rhai::serde::from_dynamic::<Value>(&v)
                .map_err(|e| format!("the returned change's data: {e}"))?,
        ),
        Some(v) => {
            return Err(format!(
                "the returned change's data must be a map or (), not {}",
                v.type_name()
            ))
        }
    };
    if op == Op::Upsert && data.is_none() {
        return Err("the returned change is an upsert without data".into());
    }
    Ok(Change {
        id,
        kind,
        reference,
        op,
        data,
        source,
        seq,
    })
}

#[cfg(test)]
mod key_tests {
    use super::*;

    #[test]
    fn key_of_names_the_field_and_value() {
        let mapping: Mapping = toml::from_str(
            "[types.\"Catalog.Контрагенты\"]\nkey = \"ИНН\"\n[types.\"Catalog.Bad\"]\nkey = \"a.b\"\n",
        )
        .unwrap();
        let problems = Compiled::new(&mapping, Path::new(".")).err().unwrap();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].contains("key"), "{problems:?}");
        let ok: Mapping =
            toml::from_str("[types.\"Catalog.Контрагенты\"]\nkey = \"ИНН\"\n").unwrap();
        let compiled = Compiled::new(&ok, Path::new(".")).unwrap();
        assert!(compiled.is_identity(), "a key alone reshapes nothing");
        let change = Change {
            id: "1".into(),
            kind: "Catalog.Контрагенты".into(),
            reference: "r".into(),
            op: Op::Upsert,
            data: Some(serde_json::json!({"ИНН": "7701234567"})),
            source: "a".into(),
            seq: 1,
        };
        assert_eq!(compiled.key_of(&change).as_deref(), Some("ИНН=7701234567"));
        let other = Change {
            kind: "Catalog.X".into(),
            ..change
        };
        assert_eq!(compiled.key_of(&other), None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::parse_change;
    use serde_json::json;
    use std::path::PathBuf;

    const ORDER: &str = "Document.ЗаказКлиента";
    const NOMENCLATURE_1: &str = "5f1c2a3e-8d4b-11ee-b9d1-0242ac120002";
    const NOMENCLATURE_2: &str = "f9a0b1c2-8d4b-11ee-b9d1-0242ac120002";
    const COUNTERPARTY: &str = "e2f3a4b5-8d4b-11ee-b9d1-0242ac120002";
    const OFFER: &str = "e8f9a0b1-8d4b-11ee-b9d1-0242ac120002";
    const FIXTURES: [&str; 5] = [
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

    fn fixtures_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/1c")
    }

    fn fixture(name: &str) -> Value {
        let path = fixtures_dir().join(name);
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path:?}: {e}"))
    }

    fn from_model(c: crate::model::Change) -> Change {
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
    fn load(name: &str) -> Change {
        from_model(parse_change(fixture(name)).unwrap_or_else(|e| panic!("{name}: {e}")))
    }

    fn unposted_order() -> Change {
        let mut order = load("document-order.json");
        order.reference = "b5c6d7e8-0000-11ee-b9d1-0242ac120002".into();
        let data = order.data.as_mut().unwrap();
        data["Ref"] = json!(order.reference);
        data["Posted"] = json!(false);
        order
    }

    fn plain(kind: &str, reference: &str, data: Value) -> Change {
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

    fn mapping(toml_text: &str) -> Mapping {
        toml::from_str(toml_text).unwrap_or_else(|e| panic!("{toml_text}\n{e}"))
    }

    fn compile(toml_text: &str) -> Compiled {
        Compiled::new(&mapping(toml_text), &fixtures_dir())
            .unwrap_or_else(|problems| panic!("{toml_text}\n{problems:#?}"))
    }

    fn problems(toml_text: &str) -> Vec<String> {
        match Compiled::new(&mapping(toml_text), &fixtures_dir()) {
            Ok(_) => panic!("{toml_text}\nwas accepted"),
            Err(problems) => problems,
        }
    }

    /// A mapping with rules for the customer order only.
    fn order_rules(rules: &str) -> Compiled {
        compile(&format!("[types.\"{ORDER}\"]\n{rules}"))
    }

    fn delivered(outcome: Outcome) -> Change {
        match outcome {
            Outcome::Deliver(change) => change,
            other => panic!("expected a delivery, got {other:?}"),
        }
    }

    fn no_remap() -> Remap {
        Remap::new()
    }

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
    fn deletions_pass_filters_but_not_skip() {
        let deletion = load("object-deletion.json");
        assert_eq!(deletion.op, Op::Delete);
        let filtered = compile(
            "[types.\"Catalog.Номенклатура\"]\nfilter = [{ field = \"DeletionMark\", eq = false }]\nrename = \"product\"\nset = { x = 1 }",
        );
        let out = delivered(filtered.apply(deletion.clone(), &no_remap()));
        assert_eq!(
            (out.kind.as_str(), out.op, &out.data),
            ("product", Op::Delete, &None)
        );
        assert_eq!(out.reference, deletion.reference);

        let skipped = compile("[types.\"Catalog.Номенклатура\"]\nskip = true");
        for change in [deletion, load("catalog-nomenclature.json")] {
            assert_eq!(
                skipped.apply(change, &no_remap()),
                Outcome::Filtered(
                    "type Catalog.Номенклатура is skipped by the route mapping".into()
                )
            );
        }
    }

    #[test]
    fn star_rules_apply_to_types_without_their_own() {
        let compiled = compile(
            r#"[types."*"]
set = { via = "star" }
[types."Catalog.Номенклатура"]
set = { via = "exact" }
[types."Catalog.Контрагенты"]
"#,
        );
        // (fixture, value of `via`)
        let cases = [
            ("catalog-nomenclature.json", Some(json!("exact"))),
            ("document-order.json", Some(json!("star"))),
            ("register-prices.json", Some(json!("star"))),
            ("catalog-counterparty.json", None),
        ];
        for (file, want) in cases {
            let data = delivered(compiled.apply(load(file), &no_remap()))
                .data
                .unwrap();
            assert_eq!(data.get("via"), want.as_ref(), "{file}");
        }

        let skip_others = compile("[types.\"*\"]\nskip = true\n[types.\"Catalog.Номенклатура\"]\n");
        let out = skip_others.apply(load("catalog-nomenclature.json"), &no_remap());
        assert_eq!(out, Outcome::Deliver(load("catalog-nomenclature.json")));
        assert_eq!(
            skip_others.apply(load("document-order.json"), &no_remap()),
            Outcome::Filtered(format!("type {ORDER} is skipped by the route mapping"))
        );
    }

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

    /// What a script test expects: delivery (with checks), filtering or failure (with a part
    /// of the reason).
    enum Expect {
        Deliver(&'static str, Vec<(&'static str, Option<Value>)>),
        Filtered(&'static str),
        Failed(&'static str),
    }

    #[test]
    fn scripts_reshape_drop_or_fail() {
        let cases: Vec<(&str, &str, Change, Expect)> = vec![
            (
                "modifies data",
                r#"change.data.scripted = true;
change.data.Товары[0].Цена += 1;
change.data.remove("Комментарий");
change.data.источник = change.source + "/" + change.seq + "/" + change.op;
change"#,
                load("document-order.json"),
                Expect::Deliver(
                    ORDER,
                    vec![
                        ("/scripted", Some(json!(true))),
                        ("/Товары/0/Цена", Some(json!(18451))),
                        ("/Товары/1/Цена", Some(json!(2460))),
                        ("/Вес", None),
                        ("/Комментарий", None),
                        ("/источник", Some(json!("central/1/upsert"))),
                        ("/Основание/#value", Some(json!(OFFER))),
                    ],
                ),
            ),
            (
                "renames the type, leaving out keys keeps them",
                r#"#{ "type": "Документ." + change.data.Number }"#,
                load("document-order.json"),
                Expect::Deliver(
                    "Документ.ЦБ-000315",
                    vec![("/Number", Some(json!("ЦБ-000315")))],
                ),
            ),
            (
                "floats survive",
                "change.data.Вес *= 2.0; change",
                load("catalog-nomenclature.json"),
                Expect::Deliver("Catalog.Номенклатура", vec![("/Вес", Some(json!(37.0)))]),
            ),
            (
                "returns () to drop",
                "if change.data.Posted { change } else { () }",
                unposted_order(),
                Expect::Filtered("the route script dropped it"),
            ),
            (
                "keeps what it returns",
                "if change.data.Posted { change } else { () }",
                load("document-order.json"),
                Expect::Deliver(ORDER, vec![("/Posted", Some(json!(true)))]),
            ),
            (
                "sees a deletion without data",
                r#"if change.op == "delete" && type_of(change.data) == "()" { change.type = "deleted"; } change"#,
                load("object-deletion.json"),
                Expect::Deliver("deleted", vec![]),
            ),
            (
                "throws",
                r#"if change.ref != "" { throw "no price for " + change.data.Code; } change"#,
                load("catalog-nomenclature.json"),
                Expect::Failed("script error: Runtime error: no price for 00-00000127"),
            ),
            (
                "fails at runtime",
                "change.data.Number.nope(); change",
                load("document-order.json"),
                Expect::Failed("script error: Function not found"),
            ),
            (
                "loops forever",
                "loop { }",
                load("document-order.json"),
                Expect::Failed("script error"),
            ),
            (
                "can't sleep",
                "sleep(30); change",
                load("document-order.json"),
                Expect::Failed("sleep is not available in route scripts"),
            ),
            (
                "grows a string past the limit",
                r#"let s = "x"; loop { s += s; }"#,
                load("document-order.json"),
                Expect::Failed("script error"),
            ),
            (
                "returns something else",
                "42",
                load("document-order.json"),
                Expect::Failed("script error: the script returned i64"),
            ),
            (
                "returns a bad op",
                r#"change.op = "merge"; change"#,
                load("document-order.json"),
                Expect::Failed(r#"op is "merge""#),
            ),
            (
                "returns an upsert without data",
                "change.data = (); change",
                load("document-order.json"),
                Expect::Failed("upsert without data"),
            ),
            (
                "returns a type with a space",
                r#"change.type = "Заказ клиента"; change"#,
                load("document-order.json"),
                Expect::Failed("type: \"Заказ клиента\" contains whitespace"),
            ),
            (
                "returns a non-string ref",
                "change.ref = 5; change",
                load("document-order.json"),
                Expect::Failed("ref must be a string, not i64"),
            ),
        ];
        for (case, script, change, expect) in cases {
            let compiled = compile(&format!("script = '''\n{script}\n'''"));
            let start = Instant::now();
            let outcome = compiled.apply(change.clone(), &no_remap());
            assert!(
                start.elapsed() < Duration::from_secs(1),
                "{case}: took {:?}",
                start.elapsed()
            );
            match (outcome, expect) {
                (Outcome::Deliver(out), Expect::Deliver(kind, checks)) => {
                    assert_eq!(out.kind, kind, "{case}");
                    assert_eq!(
                        (&out.id, &out.reference, out.op, &out.source, out.seq),
                        (
                            &change.id,
                            &change.reference,
                            change.op,
                            &change.source,
                            change.seq
                        ),
                        "{case}"
                    );
                    let data = out.data.unwrap_or(Value::Null);
                    for (pointer, want) in checks {
                        assert_eq!(data.pointer(pointer), want.as_ref(), "{case}: {pointer}");
                    }
                }
                (Outcome::Filtered(reason), Expect::Filtered(needle))
                | (Outcome::Failed(reason), Expect::Failed(needle)) => {
                    assert!(
                        reason.contains(needle),
                        "{case}: {reason:?} lacks {needle:?}"
                    )
                }
                (other, _) => panic!("{case}: unexpected {other:?}"),
            }
        }
    }

    #[test]
    fn an_endless_script_is_stopped_within_a_second_and_the_next_change_flows() {
        let compiled = compile(
            r#"script = '''
if change.ref == "loops" { loop { let x = [1, 2, 3]; x.push(4); } }
change
'''"#,
        );
        let mut looping = load("document-order.json");
        looping.reference = "loops".into();
        let start = Instant::now();
        match compiled.apply(looping, &no_remap()) {
            Outcome::Failed(e) => assert!(e.starts_with("script error: "), "{e}"),
            other => panic!("{other:?}"),
        }
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "{:?}",
            start.elapsed()
        );
        let good = load("document-order.json");
        assert_eq!(
            compiled.apply(good.clone(), &no_remap()),
            Outcome::Deliver(good)
        );
    }

    #[test]
    fn the_time_limit_stops_a_script_under_the_operation_limit() {
        let compiled = compile("script = 'loop { }'");
        let _deadline = Deadline::start(Duration::ZERO);
        let script = compiled.script.as_ref().unwrap();
        let mut scope = rhai::Scope::new();
        let e = script
            .engine
            .eval_ast_with_scope::<Dynamic>(&mut scope, &script.ast)
            .unwrap_err();
        assert_eq!(
            script_error(&e),
            "script error: ran longer than 100 ms and was stopped"
        );
    }

    #[test]
    fn script_file_is_read_relative_to_the_base_dir() {
        let dir = std::env::temp_dir().join(format!("lxbridge-transform-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("маршрут.rhai"),
            "change.data.from_file = true;\nchange\n",
        )
        .unwrap();
        let compiled = Compiled::new(&mapping(r#"script_file = "маршрут.rhai""#), &dir);
        std::fs::remove_dir_all(&dir).unwrap();
        let compiled = compiled.unwrap_or_else(|p| panic!("{p:?}"));
        let out = delivered(compiled.apply(load("document-order.json"), &no_remap()));
        assert_eq!(out.data.unwrap()["from_file"], true);
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

    #[test]
    fn identity_passes_everything_unchanged() {
        let identity = Compiled::identity();
        assert!(identity.is_identity());
        for file in FIXTURES {
            let change = load(file);
            assert_eq!(
                identity.apply(change.clone(), &no_remap()),
                Outcome::Deliver(change),
                "{file}"
            );
        }
        // (mapping, is identity)
        let cases = [
            ("", true),
            ("[types.\"Catalog.X\"]\n[types.\"*\"]", true),
            ("[types.\"*\"]\nrefs = { a = \"Catalog.A\" }", false),
            ("[types.\"Catalog.X\"]\nskip = true", false),
            ("[types.\"Catalog.X\"]\nkeep = []", false),
            ("script = 'change'", false),
        ];
        for (toml_text, want) in cases {
            assert_eq!(compile(toml_text).is_identity(), want, "{toml_text}");
        }
        let order = load("document-order.json");
        assert_eq!(
            compile("[types.\"*\"]").apply(order.clone(), &no_remap()),
            Outcome::Deliver(order)
        );
    }

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
