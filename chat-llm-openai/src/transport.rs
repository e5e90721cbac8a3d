//! The HTTP transport under async-openai: retries before the response starts
//! and typed upstream errors that keep the server's message and `Retry-After`.

use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_openai::error::OpenAIError;
use async_openai::middleware::HttpRequestFactory;
use chat_core::ModelError;
#[cfg(not(target_arch = "wasm32"))]
type SendFuture = futures::future::BoxFuture<'static, Result<reqwest::Response, OpenAIError>>;
// fetch-based reqwest futures are not `Send` on wasm32.
#[cfg(target_arch = "wasm32")]
type SendFuture = futures::future::LocalBoxFuture<'static, Result<reqwest::Response, OpenAIError>>;
use serde_json::Value;

/// When and how often a failed request is sent again. Only the request is
/// retried: once a response has started streaming nothing is replayed.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RetryPolicy {
    pub(crate) max_retries: u32,
    pub(crate) first_backoff: Duration,
    pub(crate) max_retry_after: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_retries: 3,
            first_backoff: Duration::from_millis(250),
            max_retry_after: Duration::from_secs(30),
        }
    }
}

const MAX_BACKOFF: Duration = Duration::from_secs(8);

impl RetryPolicy {
    /// Exponential backoff with ±25 % jitter.
    fn backoff(&self, attempt: u32) -> Duration {
        let base = self
            .first_backoff
            .saturating_mul(2u32.saturating_pow(attempt))
            .min(MAX_BACKOFF);
        // A random u64 without a dependency: std seeds every RandomState randomly.
        let r = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        let factor = 0.75 + (r % 1000) as f64 / 2000.0;
        base.mul_f64(factor)
    }
}

/// Removes configured secrets from text that may reach logs or clients.
#[derive(Debug, Clone, Default)]
pub(crate) struct Redactor(Arc<[String]>);

impl Redactor {
    pub(crate) fn new(secrets: Vec<String>) -> Self {
        Self(
            secrets
                .into_iter()
                .filter(|s| s.len() >= 4)
                .collect::<Vec<_>>()
                .into(),
        )
    }

    pub(crate) fn clean(&self, text: &str) -> String {
        let mut out = text.to_owned();
        for s in self.0.iter() {
            if out.contains(s.as_str()) {
                out = out.replace(s.as_str(), "***");
            }
        }
        out
    }
}

/// Whether an HTTP status is worth retrying (timeout, conflict, rate limit, server errors).
pub(crate) fn is_retryable_status(status: u16) -> bool {
    matches!(status, 408 | 409 | 429 | 500..=599)
}

/// Cuts `s` to at most `max` bytes on a char boundary.
pub(crate) fn truncate(s: &mut String, max: usize) {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push('…');
    }
}

/// A non-2xx answer of the server, read before any streaming started.
#[derive(Debug, thiserror::Error)]
#[error("{status}: {message}")]
pub(crate) struct UpstreamError {
    status: u16,
    message: String,
    retry_after: Option<Duration>,
    retryable: bool,
}

impl UpstreamError {
    async fn read(response: reqwest::Response, redactor: &Redactor) -> Self {
        let status = response.status();
        let retry_after = retry_after(response.headers());
        let body = response.bytes().await.unwrap_or_default();
        let (mut message, kind) = error_message(&body);
        if message.trim().is_empty() {
            status
                .canonical_reason()
                .unwrap_or("error")
                .clone_into(&mut message);
        }
        let mut message = redactor.clean(message.trim());
        truncate(&mut message, 1000);
        // A 429 for an exhausted quota will not clear up by waiting.
        let quota = kind.as_deref() == Some("insufficient_quota");
        Self {
            status: status.as_u16(),
            message,
            retry_after,
            retryable: is_retryable_status(status.as_u16()) && !quota,
        }
    }

    pub(crate) fn into_model_error(self) -> ModelError {
        if self.retryable {
            ModelError::Unavailable {
                message: format!("{}: {}", self.status, self.message),
                retry_after: self.retry_after,
            }
        } else {
            ModelError::Rejected {
                status: self.status,
                message: self.message,
            }
        }
    }
}

/// The message of an error body (OpenAI `{"error":{"message"}}`, vLLM
/// `{"message"}`, FastAPI `{"detail"}`, or plain text) and its type/code.
fn error_message(body: &[u8]) -> (String, Option<String>) {
    let Ok(v) = serde_json::from_slice::<Value>(body) else {
        return (String::from_utf8_lossy(body).into_owned(), None);
    };
    let err = v.get("error").unwrap_or(&v);
    let kind = ["code", "type"]
        .iter()
        .find_map(|k| err.get(*k).and_then(Value::as_str))
        .map(str::to_owned);
    let message = match err {
        Value::String(s) => s.clone(),
        _ => ["message", "detail", "msg"]
            .iter()
            .find_map(|k| err.get(*k))
            .map_or_else(
                || v.to_string(),
                |m| m.as_str().map_or_else(|| m.to_string(), str::to_owned),
            ),
    };
    (message, kind)
}

/// `retry-after-ms` (OpenAI), else `retry-after` in seconds or as an HTTP date.
fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let get = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    };
    if let Some(ms) = get("retry-after-ms").and_then(|v| v.parse::<f64>().ok())
        && ms.is_finite()
        && ms >= 0.0
    {
        return Some(Duration::from_secs_f64(ms / 1000.0));
    }
    let v = get("retry-after")?;
    if let Ok(secs) = v.parse::<f64>() {
        return (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs));
    }
    let at = httpdate::parse_http_date(v).ok()?;
    Some(
        at.duration_since(std::time::SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

/// Whether the request failed before reaching the server (never on wasm32,
/// where fetch does not say).
pub(crate) fn is_connect(e: &reqwest::Error) -> bool {
    #[cfg(not(target_arch = "wasm32"))]
    {
        e.is_connect()
    }
    #[cfg(target_arch = "wasm32")]
    {
        let _ = e;
        false
    }
}

#[cfg(not(target_arch = "wasm32"))]
async fn sleep(d: Duration) {
    tokio::time::sleep(d).await;
}

#[cfg(target_arch = "wasm32")]
async fn sleep(d: Duration) {
    futures_timer::Delay::new(d).await;
}

/// The tower service async-openai sends every request through.
#[derive(Debug, Clone)]
pub(crate) struct Transport {
    http: reqwest::Client,
    retry: RetryPolicy,
    redactor: Redactor,
}

enum Failure {
    Status(UpstreamError),
    Connect(reqwest::Error),
}

impl Transport {
    pub(crate) fn new(http: reqwest::Client, retry: RetryPolicy, redactor: Redactor) -> Self {
        Self {
            http,
            retry,
            redactor,
        }
    }

    async fn send(self, factory: HttpRequestFactory) -> Result<reqwest::Response, OpenAIError> {
        let mut attempt = 0u32;
        loop {
            let request = factory.build().await?;
            let failure = match self.http.execute(request).await {
                Ok(response) if response.status().is_success() => return Ok(response),
                Ok(response) => {
                    let e = UpstreamError::read(response, &self.redactor).await;
                    if !e.retryable {
                        return Err(OpenAIError::Boxed(Box::new(e)));
                    }
                    Failure::Status(e)
                }
                // Only failures to connect are retried: a request that
                // reached the server may be running there already.
                Err(e) if is_connect(&e) => Failure::Connect(e),
                Err(e) => return Err(OpenAIError::Reqwest(e)),
            };
            let (wait, error) = match failure {
                Failure::Status(e) => (e.retry_after, OpenAIError::Boxed(Box::new(e))),
                Failure::Connect(e) => (None, OpenAIError::Reqwest(e)),
            };
            if attempt >= self.retry.max_retries {
                return Err(error);
            }
            let delay = match wait {
                Some(w) if w > self.retry.max_retry_after => return Err(error),
                Some(w) => w,
                None => self.retry.backoff(attempt),
            };
            attempt += 1;
            tracing::warn!(
                attempt,
                delay_ms = delay.as_millis() as u64,
                error = %self.redactor.clean(&error.to_string()),
                "model request failed before streaming; retrying"
            );
            sleep(delay).await;
        }
    }
}

impl tower::Service<HttpRequestFactory> for Transport {
    type Response = reqwest::Response;
    type Error = OpenAIError;
    type Future = SendFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: HttpRequestFactory) -> Self::Future {
        Box::pin(self.clone().send(request))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_bodies_of_various_servers() {
        let (m, k) = error_message(
            br#"{"error":{"message":"Incorrect API key","type":"invalid_request_error","code":"invalid_api_key"}}"#,
        );
        assert_eq!(
            (m.as_str(), k.as_deref()),
            ("Incorrect API key", Some("invalid_api_key"))
        );
        let (m, _) = error_message(br#"{"object":"error","message":"model not found","code":404}"#);
        assert_eq!(m, "model not found");
        let (m, _) = error_message(br#"{"detail":"Not Found"}"#);
        assert_eq!(m, "Not Found");
        let (m, _) = error_message(br#"{"error":"bad things"}"#);
        assert_eq!(m, "bad things");
        let (m, k) = error_message(b"upstream connect error");
        assert_eq!((m.as_str(), k), ("upstream connect error", None));
    }

    #[test]
    fn retry_after_forms() {
        let mut h = reqwest::header::HeaderMap::new();
        assert_eq!(retry_after(&h), None);
        h.insert("retry-after", "2".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_secs(2)));
        h.insert("retry-after-ms", "150".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_millis(150)));
        let mut h = reqwest::header::HeaderMap::new();
        let later = std::time::SystemTime::now() + Duration::from_secs(60);
        h.insert(
            "retry-after",
            httpdate::fmt_http_date(later).parse().unwrap(),
        );
        let d = retry_after(&h).unwrap();
        assert!(
            d > Duration::from_secs(55) && d <= Duration::from_secs(60),
            "{d:?}"
        );
    }

    #[test]
    fn backoff_grows_with_jitter_and_a_cap() {
        let p = RetryPolicy::default();
        for attempt in 0..20 {
            let d = p.backoff(attempt);
            let base = Duration::from_millis(250)
                .saturating_mul(2u32.saturating_pow(attempt))
                .min(MAX_BACKOFF);
            assert!(
                d >= base.mul_f64(0.75) && d <= base.mul_f64(1.25),
                "{attempt}: {d:?}"
            );
        }
    }

    #[test]
    fn secrets_are_redacted() {
        let r = Redactor::new(vec!["sk-abcdef".into(), "x".into()]);
        assert_eq!(
            r.clean("Incorrect API key provided: sk-abcdef."),
            "Incorrect API key provided: ***."
        );
        assert_eq!(r.clean("x marks"), "x marks");
        let mut s = "héllo".to_owned();
        truncate(&mut s, 2);
        assert_eq!(s, "h…");
    }
}
