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
//!
//! This file holds the public types (the `[route.mapping]` TOML, [`Change`], [`Outcome`],
//! [`Reference`], [`Remap`]) and [`Compiled`], which runs the parts in order:
//!
//! - `rules`: one type's rules, checked and compiled, and how they reshape data;
//! - `path`: mapping paths (`a.b[].c`): parsing and walking them through JSON;
//! - `refs`: 1C XDTO typed references and declared reference fields, found and remapped;
//! - `script`: the route's Rhai script and its sandboxed engine;
//! - `xdto`: [`to_xdto`], the 1C XDTO output form.

mod path;
mod refs;
mod rules;
mod script;
#[cfg(test)]
mod test_support;
mod xdto;

pub use rules::Filter;
pub use xdto::to_xdto;

use crate::model::Op;
use rules::{value_text, Rules};
use script::Script;
use serde::Deserialize;
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

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
        let declared = self
            .rules_for(&change.kind)
            .map_or(&[][..], |rules| rules.refs.as_slice());
        refs::references(change, declared)
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
                refs::remap_typed_refs(data, remap);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transform::test_support::*;
    use serde_json::json;

    fn _assert_send_sync() {
        fn check<T: Send + Sync>() {}
        check::<Compiled>();
    }

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
}
