//! From TOML text to a [`Config`], collecting every problem on the way instead of stopping
//! at the first: unset `${NAME}`s ([`super::env`]), keys lxbridge doesn't know (serde skips
//! them and `serde_ignored` reports each with its path), and values of the wrong type
//! (`serde_path_to_error` says where; the value is taken out and reading starts again, so
//! the next one is found too, and a setting with a default gets its default).

use super::backend::external_given;
use super::{env, Backend, Config};
use std::fmt::Write;
use std::path::PathBuf;

/// What reading config text found.
pub(super) struct Reading {
    /// The config; `None` when the text is not TOML, when a table had to be dropped for a
    /// wrong or missing value (what remains would be checked as if it had no such table),
    /// or when reading gave up.
    pub config: Option<Config>,
    /// Every problem reading met, one sentence each: the unset `${NAME}`s, then the unknown
    /// keys, then the wrong values.
    pub problems: Vec<String>,
}

/// Values of the wrong type reported at most; past them reading gives up.
const MAX_WRONG_VALUES: usize = 20;

/// Reads config text (its relative paths start from `.` until the caller says otherwise).
pub(super) fn read(text: &str) -> Reading {
    let mut value: toml::Value = match toml::from_str(text) {
        Ok(value) => value,
        Err(e) => {
            return Reading {
                config: None,
                problems: vec![format!("not valid TOML: {e}")],
            }
        }
    };
    let mut problems = env::expand(&mut value);
    let external_given = external_given(&value);
    let (config, found) = deserialize(value);
    problems.extend(found);
    let config = config.map(|mut config| {
        config.base_dir = PathBuf::from(".");
        config.external_given = external_given;
        config.backend = if external_given && config.embedded.is_none() {
            Backend::Rabbit
        } else {
            Backend::Embedded
        };
        config
    });
    Reading { config, problems }
}

/// The config typed from `value`, and the unknown keys and wrong values met (unknown keys
/// first).
fn deserialize(value: toml::Value) -> (Option<Config>, Vec<String>) {
    let mut typing = Typing {
        value,
        holes: Vec::new(),
        unknown: Vec::new(),
        wrong: Vec::new(),
        taken: Vec::new(),
        whole: true,
    };
    let config = loop {
        let error = match typing.attempt() {
            Ok(config) => break typing.whole.then_some(config),
            Err(error) if typing.wrong.len() < MAX_WRONG_VALUES => error,
            Err(_) => break None,
        };
        if !typing.take_out(&error) {
            break None;
        }
    };
    let mut problems: Vec<String> = typing
        .unknown
        .iter()
        .map(|key| format!("unknown key {key} (misspelt, or in the wrong section?)"))
        .collect();
    problems.extend(typing.wrong);
    (config, problems)
}

type WrongValue = serde_path_to_error::Error<toml::de::Error>;

/// Typing a config again and again, each time without the wrong value found the time before.
/// Paths are said as in the file: `holes` remembers the array elements taken out, whose
/// followers moved up.
struct Typing {
    value: toml::Value,
    /// Array elements taken out: the array's path and the element's index, as in the file.
    holes: Vec<(Vec<Step>, usize)>,
    unknown: Vec<String>,
    wrong: Vec<String>,
    /// The values taken out, as in the file.
    taken: Vec<Vec<Step>>,
    /// No table was taken out, so the config is the file's but for some defaults.
    whole: bool,
}

impl Typing {
    /// One deserialization: the config or the first wrong value; the keys skipped until
    /// then join `unknown`.
    fn attempt(&mut self) -> Result<Config, WrongValue> {
        let mut ignored = Vec::new();
        let mut note = |path: serde_ignored::Path| {
            let mut steps = Vec::new();
            ignored_steps(&path, &mut steps);
            ignored.push(steps);
        };
        let result = serde_path_to_error::deserialize(serde_ignored::Deserializer::new(
            self.value.clone(),
            &mut note,
        ));
        for steps in ignored {
            let key = show(&self.in_file(&with_variants(&self.value, &steps)));
            if !self.unknown.contains(&key) {
                self.unknown.push(key);
            }
        }
        result
    }

    /// Records the wrong value and takes it out; false when it can't be found.
    fn take_out(&mut self, error: &WrongValue) -> bool {
        let message = error.inner().message().to_string();
        let missing = message.starts_with("missing field");
        let Some(at) = steps_of(error.path()) else {
            self.wrong.push(message);
            return false;
        };
        let in_file = self.in_file(&at);
        // A required value taken out for its type is now missing: that was said already.
        let consequence = missing
            && self
                .taken
                .iter()
                .any(|t| t.len() == in_file.len() + 1 && t.starts_with(&in_file));
        if !consequence {
            self.wrong.push(match in_file.as_slice() {
                [] => message,
                path => format!("{}: {message}", show(path)),
            });
        }
        let Some(was) = take(&mut self.value, &at) else {
            return false;
        };
        self.whole &= !missing && !was.is_table();
        if let Some((Step::Index(i), array)) = in_file.split_last() {
            self.holes.push((array.to_vec(), *i));
        }
        self.taken.push(in_file);
        true
    }

    /// A path in the value being typed, as in the file.
    fn in_file(&self, steps: &[Step]) -> Vec<Step> {
        let mut out = Vec::with_capacity(steps.len());
        for step in steps {
            let step = match step {
                Step::Key(key) => Step::Key(key.clone()),
                Step::Index(i) => {
                    let mut holes: Vec<usize> = self
                        .holes
                        .iter()
                        .filter(|(array, _)| *array == out)
                        .map(|(_, hole)| *hole)
                        .collect();
                    holes.sort_unstable();
                    let mut index = *i;
                    for hole in holes {
                        if hole <= index {
                            index += 1;
                        }
                    }
                    Step::Index(index)
                }
            };
            out.push(step);
        }
        out
    }
}

/// A key or an array index on the way to a value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Step {
    Key(String),
    Index(usize),
}

/// A path as problems name it: `node[1].deliver.url`, `route[0].mapping.types."Catalog.X"`.
pub(super) fn show(steps: &[Step]) -> String {
    let mut out = String::new();
    for step in steps {
        match step {
            Step::Index(i) => {
                let _ = write!(out, "[{i}]");
            }
            Step::Key(key) => {
                if !out.is_empty() {
                    out.push('.');
                }
                let bare = !key.is_empty()
                    && key
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
                if bare {
                    out.push_str(key);
                } else {
                    let _ = write!(out, "{key:?}");
                }
            }
        }
    }
    out
}

fn ignored_steps(path: &serde_ignored::Path, out: &mut Vec<Step>) {
    use serde_ignored::Path;
    match path {
        Path::Root => {}
        Path::Seq { parent, index } => {
            ignored_steps(parent, out);
            out.push(Step::Index(*index));
        }
        Path::Map { parent, key } => {
            ignored_steps(parent, out);
            out.push(Step::Key(key.clone()));
        }
        Path::Some { parent }
        | Path::NewtypeStruct { parent }
        | Path::NewtypeVariant { parent } => ignored_steps(parent, out),
    }
}

/// `steps` from `serde_ignored`, which leaves out the variant of an enum written as a
/// one-key table (`auth = { basic = { … } }`): that key is put back where a step is not
/// found but the table's one value holds it.
fn with_variants(value: &toml::Value, steps: &[Step]) -> Vec<Step> {
    let mut out = Vec::with_capacity(steps.len() + 1);
    let mut at = Some(value);
    for step in steps {
        if let (Step::Key(key), Some(toml::Value::Table(table))) = (step, at) {
            if !table.contains_key(key) && table.len() == 1 {
                if let Some((variant, inner)) = table.iter().next() {
                    if inner.get(key.as_str()).is_some() {
                        out.push(Step::Key(variant.clone()));
                        at = Some(inner);
                    }
                }
            }
        }
        at = match (step, at) {
            (Step::Key(key), Some(toml::Value::Table(table))) => table.get(key),
            (Step::Index(i), Some(toml::Value::Array(items))) => items.get(*i),
            _ => None,
        };
        out.push(step.clone());
    }
    out
}

/// The steps of an error's path; `None` when serde lost track of where it was.
fn steps_of(path: &serde_path_to_error::Path) -> Option<Vec<Step>> {
    use serde_path_to_error::Segment;
    path.iter()
        .map(|segment| match segment {
            Segment::Seq { index } => Some(Step::Index(*index)),
            // An enum's variant is the key of its one-key table (`auth = { basic = … }`).
            Segment::Map { key } | Segment::Enum { variant: key } => Some(Step::Key(key.clone())),
            Segment::Unknown => None,
        })
        .collect()
}

/// Takes the value at `steps` out of `value`; `None` when there is none there.
fn take(value: &mut toml::Value, steps: &[Step]) -> Option<toml::Value> {
    let (last, parents) = steps.split_last()?;
    let mut at = value;
    for step in parents {
        at = match (step, at) {
            (Step::Key(key), toml::Value::Table(table)) => table.get_mut(key)?,
            (Step::Index(i), toml::Value::Array(items)) => items.get_mut(*i)?,
            _ => return None,
        };
    }
    match (last, at) {
        (Step::Key(key), toml::Value::Table(table)) => table.remove(key),
        (Step::Index(i), toml::Value::Array(items)) if *i < items.len() => Some(items.remove(*i)),
        _ => None,
    }
}
