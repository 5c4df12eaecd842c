//! The body of a changes request: content type, size limit and gzip, and its items
//! (one JSON change, an array of them, or NDJSON lines), each a change or what is wrong with it.

use crate::http::error_response;
use crate::model::{parse_change, Change};
use axum::body::Body;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::Response;
use serde_json::Value;
use std::io::Read;

pub(super) enum BodyKind {
    Json,
    NdJson,
}

/// `Content-Type` as sent, and its media type lower-cased without parameters.
pub(super) fn media_type(headers: &HeaderMap) -> (&str, String) {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let essence = ct.split(';').next().unwrap_or("").trim();
    (ct, essence.to_ascii_lowercase())
}

pub(super) fn body_kind(headers: &HeaderMap) -> Result<BodyKind, String> {
    let (_, essence) = media_type(headers);
    match essence.as_str() {
        "application/json" => Ok(BodyKind::Json),
        "application/x-ndjson" | "application/ndjson" | "application/jsonl" => Ok(BodyKind::NdJson),
        "" => Err("missing Content-Type: use application/json or application/x-ndjson".into()),
        other => Err(format!(
            "Content-Type {other:?} is not supported: use application/json or application/x-ndjson"
        )),
    }
}

/// Reads the body within `max` bytes, decompressing gzip; a bomb stops at `max` + 1 bytes.
pub(super) async fn read_body(
    headers: &HeaderMap,
    body: Body,
    max: usize,
) -> Result<Vec<u8>, Response> {
    let encoding = headers
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("identity")
        .trim()
        .to_ascii_lowercase();
    let too_large = || {
        error_response(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("body is larger than server.max_body_bytes ({max} bytes) after decompression"),
        )
    };
    // gzip of incompressible data is slightly larger than the data: allow a margin on the wire.
    let raw = axum::body::to_bytes(body, max + max / 64 + 1024)
        .await
        .map_err(|_| too_large())?;
    match encoding.as_str() {
        "identity" | "" => {
            if raw.len() > max {
                return Err(too_large());
            }
            Ok(raw.to_vec())
        }
        "gzip" | "x-gzip" => {
            let mut out = Vec::with_capacity((raw.len() * 4).min(max));
            flate2::read::MultiGzDecoder::new(&raw[..])
                .take(max as u64 + 1)
                .read_to_end(&mut out)
                .map_err(|e| {
                    error_response(
                        StatusCode::BAD_REQUEST,
                        format!("gzip body is corrupt: {e}"),
                    )
                })?;
            if out.len() > max {
                return Err(too_large());
            }
            Ok(out)
        }
        other => Err(error_response(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("Content-Encoding {other:?} is not supported: use gzip or none"),
        )),
    }
}

/// Splits the body into items: each a change or what is wrong with it.
pub(super) fn parse_items(
    kind: BodyKind,
    body: &[u8],
) -> Result<Vec<Result<Change, String>>, String> {
    match kind {
        BodyKind::Json => {
            let value: Value =
                serde_json::from_slice(body).map_err(|e| format!("body is not valid JSON: {e}"))?;
            let items = match value {
                Value::Array(items) => items,
                obj @ Value::Object(_) => vec![obj],
                _ => {
                    return Err("body must be a change object or an array of change objects".into())
                }
            };
            if items.is_empty() {
                return Err("body holds no changes (empty array)".into());
            }
            Ok(items
                .into_iter()
                .map(|v| parse_change(v).map_err(|e| e.0))
                .collect())
        }
        BodyKind::NdJson => {
            let text = std::str::from_utf8(body).map_err(|e| format!("body is not UTF-8: {e}"))?;
            let items: Vec<Result<Change, String>> = text
                .lines()
                .filter(|l| !l.trim().is_empty())
                .map(|line| match serde_json::from_str::<Value>(line) {
                    Ok(v) => parse_change(v).map_err(|e| e.0),
                    Err(e) => Err(format!("line is not valid JSON: {e}")),
                })
                .collect();
            if items.is_empty() {
                return Err("body holds no changes (no non-blank line)".into());
            }
            if items
                .iter()
                .all(|i| matches!(i, Err(e) if e.starts_with("line is not valid JSON")))
            {
                return Err("body is not NDJSON: no line is valid JSON".into());
            }
            Ok(items)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ndjson_lines_are_items_and_all_broken_is_an_error() {
        let body =
            b"{\"type\":\"Catalog.X\",\"ref\":\"a\",\"data\":{}}\n\nnot json\n{\"ref\":\"b\"}\n";
        let items = parse_items(BodyKind::NdJson, body).unwrap();
        assert_eq!(items.len(), 3);
        assert!(items[0].is_ok());
        assert!(items[1].as_ref().unwrap_err().contains("not valid JSON"));
        assert!(items[2].as_ref().unwrap_err().contains("type: missing"));
        assert!(parse_items(BodyKind::NdJson, b"nope\nnada\n").is_err());
        assert!(parse_items(BodyKind::Json, b"{broken").is_err());
        assert!(parse_items(BodyKind::Json, b"[]").is_err());
        assert!(parse_items(BodyKind::Json, b"42").is_err());
    }
}
