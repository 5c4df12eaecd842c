//! `${NAME}` in the config's string values, replaced from the environment before the
//! values are typed. Every name that is not set is reported with the key it is in, and its
//! `${NAME}` is left as written, so reading goes on and finds the file's other problems.

use super::read::{show, Step};
use std::env::VarError;

/// Replaces every `${NAME}` in the string values of `value`; one problem per name that
/// can't be replaced (and per unterminated `${`).
pub(super) fn expand(value: &mut toml::Value) -> Vec<String> {
    let mut problems = Vec::new();
    walk(value, &mut Vec::new(), &mut problems);
    problems
}

fn walk(value: &mut toml::Value, at: &mut Vec<Step>, problems: &mut Vec<String>) {
    match value {
        toml::Value::String(text) if text.contains("${") => {
            *text = expand_text(text, &show(at), problems);
        }
        toml::Value::Array(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                at.push(Step::Index(i));
                walk(item, at, problems);
                at.pop();
            }
        }
        toml::Value::Table(table) => {
            for (key, item) in table.iter_mut() {
                at.push(Step::Key(key.clone()));
                walk(item, at, problems);
                at.pop();
            }
        }
        _ => {}
    }
}

/// `text` with each `${NAME}` that is set replaced by its value; the others stay as
/// written and are reported as problems of the key `at`.
fn expand_text(text: &str, at: &str, problems: &mut Vec<String>) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find('}') else {
            problems.push(format!("{at}: unterminated ${{ in value {text:?}"));
            out.push_str(&rest[start..]);
            return out;
        };
        let name = &after[..end];
        match std::env::var(name) {
            Ok(value) => out.push_str(&value),
            Err(why) => {
                let state = match why {
                    VarError::NotPresent => "is not set",
                    VarError::NotUnicode(_) => "is not valid Unicode",
                };
                problems.push(format!(
                    "{at}: environment variable {name} (used as ${{{name}}}) {state}"
                ));
                out.push_str(&rest[start..start + 2 + end + 1]);
            }
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_names_are_replaced_and_every_unset_one_is_reported_where_it_is() {
        std::env::set_var("LXB_ENV_TEST_SET", "yes");
        let mut value: toml::Value = toml::from_str(
            "a = \"x-${LXB_ENV_TEST_SET}-${LXB_ENV_TEST_UNSET_1}\"\n\
             [[node]]\ntoken = \"${LXB_ENV_TEST_UNSET_2}\"\n\
             [[node]]\nlist = [\"ok\", \"${LXB_ENV_TEST_UNSET_1\"]\n",
        )
        .unwrap();
        let problems = expand(&mut value);
        assert_eq!(
            problems,
            [
                "a: environment variable LXB_ENV_TEST_UNSET_1 (used as ${LXB_ENV_TEST_UNSET_1}) is not set",
                "node[0].token: environment variable LXB_ENV_TEST_UNSET_2 (used as ${LXB_ENV_TEST_UNSET_2}) is not set",
                "node[1].list[1]: unterminated ${ in value \"${LXB_ENV_TEST_UNSET_1\"",
            ]
        );
        assert_eq!(value["a"].as_str(), Some("x-yes-${LXB_ENV_TEST_UNSET_1}"));
    }
}
