//! `lxbridge transform`: what each target of a route would receive for a change, offline.
//! It runs the delivery's own shaping ([`Shaping::plan`] and [`Shaping::render`]) on a
//! change, with an empty remap table and no delivery marks, so it shows what the running
//! service does with it the first time.

use super::Shaping;
use crate::config::{Config, RouteConfig};
use crate::transform::{self, Outcome, Reference, Remap};
use serde_json::{json, Value};

/// One JSON line per target of the route: the change as delivered, or why it would be
/// filtered or fail, with the references it carries (`references`) and, with
/// `missing_refs = "wait"`, those it waits for unless they were delivered before
/// (`waits_for`: only references to types routed from the same source to that target).
pub fn run(config: &Config, route_name: &str, input: &str) -> Result<Vec<String>, String> {
    let route = named_route(config, route_name)?;
    let value: Value =
        serde_json::from_str(input).map_err(|e| format!("the input is not JSON: {e}"))?;
    let parsed =
        crate::model::parse_change(value).map_err(|e| format!("the input is not a change: {e}"))?;
    let routed = route
        .types
        .iter()
        .any(|p| crate::route::topic_matches(&crate::route::topic_pattern(p), &parsed.kind));
    if !routed {
        let reason = format!(
            "route {route_name:?} does not take type {:?} (types: {})",
            parsed.kind,
            route.types.join(", ")
        );
        return Ok(vec![
            json!({"outcome": "not routed", "reason": reason}).to_string()
        ]);
    }
    let change = transform::Change {
        id: parsed.id.clone().unwrap_or_else(|| "preview".into()),
        kind: parsed.kind,
        reference: parsed.reference,
        op: parsed.op,
        data: parsed.data,
        source: route.from.clone(),
        seq: parsed.seq.unwrap_or(1),
    };
    let mut lines = Vec::new();
    for target in &route.to {
        lines.push(for_target(config, target, &change)?.to_string());
    }
    Ok(lines)
}

fn named_route<'a>(config: &'a Config, name: &str) -> Result<&'a RouteConfig, String> {
    config
        .routes
        .iter()
        .find(|r| r.name.as_deref() == Some(name))
        .ok_or_else(|| {
            let names: Vec<&str> = config
                .routes
                .iter()
                .filter_map(|r| r.name.as_deref())
                .collect();
            format!(
                "no route named {name:?} (named routes: {})",
                names.join(", ")
            )
        })
}

/// The preview line of one target.
fn for_target(config: &Config, target: &str, change: &transform::Change) -> Result<Value, String> {
    let deliver = config
        .node(target)
        .and_then(|n| n.deliver.as_ref())
        .ok_or_else(|| format!("route target {target:?} is not a node with [node.deliver]"))?;
    let shaping = Shaping::from_config(config, target, deliver).map_err(|p| p.join("; "))?;
    // The mapping the delivery uses: that of the first route from the source that takes
    // the type to this target (normally the named route).
    let plan = shaping.plan(change);
    let mut line = match plan.mapping.apply(change.clone(), &Remap::new()) {
        // As the target receives it: the mapped type, ref, op and data, with the change's
        // own id, source and seq (a script can't change those).
        Outcome::Deliver(c) => {
            let mut line = json!({"target": target, "outcome": "deliver", "change": {
                "id": change.id, "type": c.kind, "ref": c.reference, "op": c.op,
                "data": shaping.render(&c), "source": change.source, "seq": change.seq,
                "attempt": 1}});
            // Only a change to deliver waits for its references.
            if !plan.awaited.is_empty() {
                line["waits_for"] = refs_json(&plan.awaited);
            }
            line
        }
        Outcome::Filtered(reason) => {
            json!({"target": target, "outcome": "filtered", "reason": reason})
        }
        Outcome::Failed(error) => json!({"target": target, "outcome": "failed", "reason": error}),
    };
    line["references"] = refs_json(&plan.mapping.references(change));
    Ok(line)
}

fn refs_json(refs: &[Reference]) -> Value {
    refs.iter()
        .map(|r| json!({"type": r.kind, "ref": r.reference}))
        .collect()
}
