//! `application/x-www-form-urlencoded` bodies with bracket keys, as amoCRM and Bitrix24 send
//! their webhooks (PHP's `http_build_query`), decoded into JSON: `a[b][0][c]=x` is
//! `{"a": {"b": [{"c": "x"}]}}`. An object whose keys are `0, 1, 2, …` becomes an array,
//! `a[]=x&a[]=y` appends, values stay strings. Pure.

use serde_json::{Map, Value};

/// The form as JSON; the error names the pair that doesn't decode.
pub fn decode(body: &[u8]) -> Result<Value, String> {
    let mut root = Map::new();
    for (i, pair) in body.split(|&b| b == b'&').enumerate() {
        if pair.is_empty() {
            continue;
        }
        let (key, value) = match pair.iter().position(|&b| b == b'=') {
            Some(at) => (&pair[..at], &pair[at + 1..]),
            None => (pair, &b""[..]),
        };
        let key = unescape(key).map_err(|why| format!("form pair {}: the key {why}", i + 1))?;
        let value = unescape(value)
            .map_err(|why| format!("form pair {} ({key}): the value {why}", i + 1))?;
        let path = key_path(&key).map_err(|why| format!("form pair {} ({key}): {why}", i + 1))?;
        insert(&mut root, &path, value).map_err(|why| format!("form key {key:?}: {why}"))?;
    }
    Ok(arrays(Value::Object(root)))
}

/// `+` is a space, `%XX` a byte; the text must be UTF-8.
pub(super) fn unescape(raw: &[u8]) -> Result<String, String> {
    let mut out = Vec::with_capacity(raw.len());
    let mut bytes = raw.iter();
    while let Some(&b) = bytes.next() {
        match b {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = [bytes.next().copied(), bytes.next().copied()];
                let digit = |d: Option<u8>| d.and_then(|d| (d as char).to_digit(16));
                match (digit(hex[0]), digit(hex[1])) {
                    (Some(h), Some(l)) => out.push((h * 16 + l) as u8),
                    _ => return Err("has a % not followed by two hex digits".into()),
                }
            }
            b => out.push(b),
        }
    }
    String::from_utf8(out).map_err(|_| "is not UTF-8".into())
}

/// `a[b][]` → `["a", "b", ""]` (an empty step appends).
fn key_path(key: &str) -> Result<Vec<&str>, String> {
    let (head, mut rest) = match key.find('[') {
        Some(at) => (&key[..at], &key[at..]),
        None => (key, ""),
    };
    if head.is_empty() {
        return Err("the key has no name before its brackets".into());
    }
    let mut path = vec![head];
    while !rest.is_empty() {
        let Some(close) = rest.find(']').filter(|_| rest.starts_with('[')) else {
            // PHP keeps what follows the last bracket as text; so do we, as one more step.
            path.push(rest);
            break;
        };
        path.push(&rest[1..close]);
        rest = &rest[close + 1..];
    }
    Ok(path)
}

fn insert(map: &mut Map<String, Value>, path: &[&str], value: String) -> Result<(), String> {
    let (step, rest) = path.split_first().expect("a key has a name");
    let name = match *step {
        "" => map.len().to_string(),
        name => name.to_string(),
    };
    if rest.is_empty() {
        map.insert(name, Value::String(value));
        return Ok(());
    }
    let slot = map
        .entry(name.clone())
        .or_insert_with(|| Value::Object(Map::new()));
    match slot {
        Value::Object(inner) => insert(inner, rest, value),
        _ => Err(format!("{name:?} is both a value and a list of fields")),
    }
}

/// Objects whose keys are exactly `0..n` become arrays, at every depth.
fn arrays(value: Value) -> Value {
    let Value::Object(map) = value else {
        return value;
    };
    let numbered =
        !map.is_empty() && (0..map.len()).all(|i| map.contains_key(i.to_string().as_str()));
    if numbered {
        let mut map = map;
        let items = (0..map.len())
            .map(|i| arrays(map.remove(i.to_string().as_str()).expect("checked")))
            .collect();
        return Value::Array(items);
    }
    Value::Object(map.into_iter().map(|(k, v)| (k, arrays(v))).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn bracket_keys_become_objects_and_arrays() {
        let amo = "leads[status][0][id]=7&leads[status][0][status_id]=142\
                   &leads[status][1][id]=8&account[subdomain]=test+shop";
        assert_eq!(
            decode(amo.as_bytes()).unwrap(),
            json!({"leads": {"status": [{"id": "7", "status_id": "142"}, {"id": "8"}]},
                   "account": {"subdomain": "test shop"}})
        );
        let b24 =
            "event=ONCRMDEALUPDATE&data%5BFIELDS%5D%5BID%5D=55&auth%5Bapplication_token%5D=t%C3%A9";
        assert_eq!(
            decode(b24.as_bytes()).unwrap(),
            json!({"event": "ONCRMDEALUPDATE", "data": {"FIELDS": {"ID": "55"}},
                   "auth": {"application_token": "té"}})
        );
        assert_eq!(
            decode(b"a[]=x&a[]=y&b[2]=z&flag").unwrap(),
            json!({"a": ["x", "y"], "b": {"2": "z"}, "flag": ""})
        );
    }

    #[test]
    fn what_does_not_decode_is_named() {
        assert!(decode(b"a=%zz")
            .unwrap_err()
            .contains("pair 1 (a): the value"));
        assert!(decode(b"a=1&a[b]=2").unwrap_err().contains("\"a\" is both"));
        assert!(decode(b"[x]=1").unwrap_err().contains("no name"));
        assert!(decode(b"a=%FF").unwrap_err().contains("not UTF-8"));
    }
}
