//! Text templates with `{path}` placeholders, pure: a webhook entry's `type`/`ref`/`id`/`op`
//! and a REST target's `url`, headers and body strings (docs/integrations.md). `{{` and `}}`
//! are a literal brace. What a placeholder names is the caller's business: it is handed a
//! lookup from the placeholder's text to a JSON value.

use serde_json::Value;
use std::borrow::Cow;

/// A template, parsed once (at start, so `lxbridge validate` names a broken one).
#[derive(Debug, Clone, PartialEq)]
pub struct Template {
    parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq)]
enum Part {
    Text(String),
    Field(String),
}

impl Template {
    /// Parses `text`; the error says what is wrong (an unclosed `{`, an empty `{}`).
    pub fn parse(text: &str) -> Result<Template, String> {
        let mut parts = Vec::new();
        let mut literal = String::new();
        let mut chars = text.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '{' if chars.peek() == Some(&'{') => {
                    chars.next();
                    literal.push('{');
                }
                '}' if chars.peek() == Some(&'}') => {
                    chars.next();
                    literal.push('}');
                }
                '{' => {
                    let mut field = String::new();
                    let closed = loop {
                        match chars.next() {
                            Some('}') => break true,
                            Some('{') | None => break false,
                            Some(c) => field.push(c),
                        }
                    };
                    if !closed {
                        return Err(format!("{text:?} has a {{ that is not closed"));
                    }
                    let field = field.trim();
                    if field.is_empty() {
                        return Err(format!("{text:?} has an empty placeholder {{}}"));
                    }
                    if !literal.is_empty() {
                        parts.push(Part::Text(std::mem::take(&mut literal)));
                    }
                    parts.push(Part::Field(field.to_string()));
                }
                '}' => return Err(format!("{text:?} has a }} without its {{ (write }}}})")),
                c => literal.push(c),
            }
        }
        if !literal.is_empty() {
            parts.push(Part::Text(literal));
        }
        Ok(Template { parts })
    }

    /// The placeholders, in order.
    pub fn fields(&self) -> impl Iterator<Item = &str> {
        self.parts.iter().filter_map(|p| match p {
            Part::Field(f) => Some(f.as_str()),
            Part::Text(_) => None,
        })
    }

    /// The placeholder, when the template is exactly one and nothing else.
    pub fn single(&self) -> Option<&str> {
        match self.parts.as_slice() {
            [Part::Field(f)] => Some(f),
            _ => None,
        }
    }

    /// The text, each placeholder replaced by its value's text, `encode(placeholder, text)`:
    /// a string as it is, a number or boolean as JSON. A placeholder the lookup doesn't find,
    /// or that holds null, an object or an array, is an error naming it.
    pub fn render<'v>(
        &self,
        lookup: impl Fn(&str) -> Option<&'v Value>,
        encode: impl for<'t> Fn(&str, &'t str) -> Cow<'t, str>,
    ) -> Result<String, String> {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Text(t) => out.push_str(t),
                Part::Field(f) => match lookup(f) {
                    Some(v) => out.push_str(&encode(f, &text_of(f, v)?)),
                    None => return Err(format!("{{{f}}} is absent")),
                },
            }
        }
        Ok(out)
    }
}

/// A plain value as text; null, objects and arrays aren't text.
fn text_of<'a>(field: &str, v: &'a Value) -> Result<Cow<'a, str>, String> {
    match v {
        Value::String(s) => Ok(Cow::Borrowed(s)),
        Value::Number(n) => Ok(Cow::Owned(n.to_string())),
        Value::Bool(b) => Ok(Cow::Borrowed(if *b { "true" } else { "false" })),
        Value::Null => Err(format!("{{{field}}} is null")),
        Value::Object(_) => Err(format!("{{{field}}} is an object, not a value")),
        Value::Array(_) => Err(format!("{{{field}}} is an array, not a value")),
    }
}

/// The value at a dot path (`a.b.0.c`: a number indexes an array); the empty path is `v`.
pub fn lookup<'v>(v: &'v Value, path: &str) -> Option<&'v Value> {
    if path.is_empty() {
        return Some(v);
    }
    path.split('.').try_fold(v, |v, name| match v {
        Value::Object(map) => map.get(name),
        Value::Array(rows) => rows.get(name.parse::<usize>().ok()?),
        _ => None,
    })
}

/// No encoding: the value's text as it is.
pub fn plain<'t>(_placeholder: &str, text: &'t str) -> Cow<'t, str> {
    Cow::Borrowed(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn renders_placeholders_and_names_what_is_missing() {
        let data = json!({"id": 7, "name": "Ромашка", "deep": {"rows": [{"x": true}]}, "o": {}});
        let t = Template::parse("lead-{id}-{deep.rows.0.x} {{literal}}").unwrap();
        let got = t.render(|f| lookup(&data, f), plain).unwrap();
        assert_eq!(got, "lead-7-true {literal}");
        assert_eq!(
            Template::parse("{missing}")
                .unwrap()
                .render(|f| lookup(&data, f), plain),
            Err("{missing} is absent".into())
        );
        let err = Template::parse("{o}")
            .unwrap()
            .render(|f| lookup(&data, f), plain);
        assert_eq!(err, Err("{o} is an object, not a value".into()));
        assert_eq!(Template::parse("{name}").unwrap().single(), Some("name"));
        assert_eq!(Template::parse("x{name}").unwrap().single(), None);
        for bad in ["{open", "{}", "close}", "{a{b}", "{a}{b"] {
            assert!(Template::parse(bad).is_err(), "{bad}");
        }
        let constant = Template::parse("AmoCRM.Lead").unwrap();
        assert_eq!(constant.fields().count(), 0);
        assert_eq!(
            constant.render(|_| None, plain).unwrap(),
            "AmoCRM.Lead".to_string()
        );
    }
}
