//! What 1C is answered: plain text whose first line is `success`, `progress` or `failure`
//! (any other first line is an error to 1C), then the text its user reads in the exchange
//! log, in Russian; or the XML of a `mode=query`.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Success,
    Progress,
    Failure,
}

impl Status {
    pub fn word(self) -> &'static str {
        match self {
            Status::Success => "success",
            Status::Progress => "progress",
            Status::Failure => "failure",
        }
    }
}

/// One answer: the status line and the lines after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub status: Status,
    pub lines: String,
    /// 401 for a wrong password (the body still starts with `failure`).
    pub http: StatusCode,
}

impl Answer {
    fn new(status: Status, lines: impl Into<String>) -> Answer {
        Answer {
            status,
            lines: lines.into(),
            http: StatusCode::OK,
        }
    }

    pub fn success(lines: impl Into<String>) -> Answer {
        Answer::new(Status::Success, lines)
    }

    pub fn progress(lines: impl Into<String>) -> Answer {
        Answer::new(Status::Progress, lines)
    }

    pub fn failure(lines: impl Into<String>) -> Answer {
        Answer::new(Status::Failure, lines)
    }

    /// Prefixes the text with the file it is about.
    pub fn about(mut self, file: &str) -> Answer {
        self.lines = format!("файл «{file}»: {}", self.lines);
        self
    }

    /// Logs the same in English (a failure at WARN).
    pub fn logged(self, node: &str, english: impl AsRef<str>) -> Answer {
        tracing::warn!(%node, "CommerceML: {}", english.as_ref());
        self
    }
}

impl IntoResponse for Answer {
    fn into_response(self) -> Response {
        let mut body = self.status.word().to_string();
        if !self.lines.is_empty() {
            body.push('\n');
            body.push_str(&self.lines);
        }
        let mut response = (self.http, body).into_response();
        response.extensions_mut().insert(self.status);
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        if self.http == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"lxbridge\", charset=\"UTF-8\""),
            );
        }
        response
    }
}
