//! Mapping paths (`Товары[].Номенклатура`): parsing them, with the problems `Compiled::new`
//! reports, and walking them through JSON data (values, and the objects holding a path's
//! last name, created on the way where asked).

use serde_json::{Map, Value};

/// One name of a path; `each` when it was written `name[]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Segment {
    pub(super) name: String,
    pub(super) each: bool,
}

/// A parsed path; `segments` is never empty.
#[derive(Debug, Clone)]
pub(super) struct FieldPath {
    pub(super) text: String,
    pub(super) segments: Vec<Segment>,
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

    pub(super) fn parent(&self) -> &[Segment] {
        &self.segments[..self.segments.len() - 1]
    }

    pub(super) fn last(&self) -> &Segment {
        &self.segments[self.segments.len() - 1]
    }

    pub(super) fn depth(&self) -> usize {
        self.segments.len()
    }
}

/// Calls `f` with every value at `segments` below `v`.
pub(super) fn visit_values<'a>(v: &'a Value, segments: &[Segment], f: &mut impl FnMut(&'a Value)) {
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
pub(super) fn visit_values_mut(
    v: &mut Value,
    segments: &[Segment],
    f: &mut impl FnMut(&mut Value),
) {
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
pub(super) fn visit_objects_mut(
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

/// Parses a mapping path; `at` names where it was written. `field_end`: the path must end
/// in a name (it names a field to write, remove or rename), not in `[]`.
pub(super) fn parse_path(
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
pub(super) fn new_field_name(path: &FieldPath, target: &str) -> Result<String, String> {
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
