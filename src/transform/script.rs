//! The route script: a Rhai script compiled once per mapping and run on every change after
//! the rules, in a sandboxed engine (operation, size and depth limits, a 100 ms deadline
//! through the progress callback, no modules, `sleep` refused). It sees the change as a map
//! and returns the change to deliver or `()` to drop it.

use super::rules::check_type_name;
use super::{Change, Mapping, Outcome};
use crate::model::Op;
use rhai::{Dynamic, Engine, EvalAltResult, AST};
use serde_json::Value;
use std::cell::Cell;
use std::path::Path;
use std::time::{Duration, Instant};

/// A script's budget of Rhai operations per change.
const SCRIPT_MAX_OPERATIONS: u64 = 1_000_000;
/// A script's budget of wall time per change.
const SCRIPT_TIME_LIMIT: Duration = Duration::from_millis(100);
/// The wall clock is looked at once per this many operations.
const SCRIPT_CLOCK_EVERY: u64 = 1024;

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
pub(super) struct Script {
    engine: Engine,
    ast: AST,
}

impl Script {
    /// Reads and compiles the mapping's script, if it has one.
    pub(super) fn load(
        mapping: &Mapping,
        base_dir: &Path,
        problems: &mut Vec<String>,
    ) -> Option<Script> {
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
    pub(super) fn run(&self, change: Change) -> Outcome {
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
mod tests {
    use super::*;
    use crate::transform::test_support::*;
    use crate::transform::Compiled;
    use serde_json::json;

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
}
