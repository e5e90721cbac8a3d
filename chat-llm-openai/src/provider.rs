//! `OpenAiProvider`: configuration, the streaming call and error mapping.

use std::sync::Arc;
use std::time::Duration;

use async_openai::config::OpenAIConfig;
use async_openai::error::OpenAIError;
use async_trait::async_trait;
use chat_core::{ModelError, ModelProvider, ModelRequest, ModelStream};
use futures::StreamExt;
use reqwest::header::{HeaderName, HeaderValue};
use serde_json::Value;

use crate::mapping::{StreamChunk, StreamMapper, request_body};
use crate::transport::{Redactor, RetryPolicy, Transport, UpstreamError};

/// Default model when none is configured.
pub const DEFAULT_MODEL: &str = "gpt-4o-mini";
/// Default API base URL.
pub const DEFAULT_BASE_URL: &str = "https://api.openai.com/v1";

/// A configuration the provider cannot be built from.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// No API key while talking to api.openai.com.
    #[error("an API key is required for {0} (set OPENAI_API_KEY)")]
    MissingApiKey(String),
    /// A header name or value (key, organization, project, extra header) is not valid in HTTP.
    #[error("invalid value for header {0}")]
    InvalidHeader(String),
    /// The base URL is not an http(s) URL.
    #[error("invalid base URL {0:?}: it must start with http:// or https://")]
    InvalidBaseUrl(String),
    /// The HTTP client could not be created.
    #[error("cannot create the HTTP client: {0}")]
    HttpClient(String),
}

/// A model behind the OpenAI chat completions API (or a compatible server).
#[derive(Clone)]
pub struct OpenAiProvider {
    client: async_openai::Client<OpenAIConfig>,
    model: String,
    name: String,
    include_usage: bool,
    extra_body: Option<Arc<serde_json::Map<String, Value>>>,
    redactor: Redactor,
}

impl std::fmt::Debug for OpenAiProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the client configuration: it holds the key.
        f.debug_struct("OpenAiProvider")
            .field("model", &self.model)
            .finish_non_exhaustive()
    }
}

/// Builder of [`OpenAiProvider`].
#[derive(Clone)]
pub struct OpenAiBuilder {
    api_key: Option<String>,
    base_url: String,
    model: String,
    organization: Option<String>,
    project: Option<String>,
    headers: Vec<(String, String)>,
    connect_timeout: Duration,
    read_timeout: Duration,
    retry: RetryPolicy,
    include_usage: bool,
    extra_body: serde_json::Map<String, Value>,
}

impl std::fmt::Debug for OpenAiBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenAiBuilder")
            .field("base_url", &self.base_url)
            .field("model", &self.model)
            .field("api_key", &self.api_key.as_ref().map(|_| "***"))
            .field("connect_timeout", &self.connect_timeout)
            .field("read_timeout", &self.read_timeout)
            .field("max_retries", &self.retry.max_retries)
            .finish_non_exhaustive()
    }
}

impl Default for OpenAiBuilder {
    fn default() -> Self {
        Self {
            api_key: None,
            base_url: DEFAULT_BASE_URL.into(),
            model: DEFAULT_MODEL.into(),
            organization: None,
            project: None,
            headers: Vec::new(),
            connect_timeout: Duration::from_secs(10),
            read_timeout: Duration::from_secs(120),
            retry: RetryPolicy::default(),
            include_usage: true,
            extra_body: serde_json::Map::new(),
        }
    }
}

impl OpenAiBuilder {
    /// The API key (sent as a bearer token; never logged or printed).
    #[must_use]
    pub fn api_key(mut self, key: impl Into<String>) -> Self {
        self.api_key = Some(key.into()).filter(|k| !k.is_empty());
        self
    }

    /// Base URL, e.g. `http://localhost:8000/v1` for vLLM or
    /// `http://localhost:11434/v1` for Ollama.
    #[must_use]
    pub fn base_url(mut self, url: impl Into<String>) -> Self {
        let url = url.into();
        url.trim_end_matches('/').clone_into(&mut self.base_url);
        self
    }

    /// Model name.
    #[must_use]
    pub fn model(mut self, model: impl Into<String>) -> Self {
        self.model = model.into();
        self
    }

    /// OpenAI organization id (`OpenAI-Organization` header).
    #[must_use]
    pub fn organization(mut self, org: impl Into<String>) -> Self {
        self.organization = Some(org.into()).filter(|o| !o.is_empty());
        self
    }

    /// OpenAI project id (`OpenAI-Project` header).
    #[must_use]
    pub fn project(mut self, project: impl Into<String>) -> Self {
        self.project = Some(project.into()).filter(|p| !p.is_empty());
        self
    }

    /// An extra header on every request (e.g. `api-key` for Azure-style gateways).
    #[must_use]
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Connect timeout (default 10 s).
    #[must_use]
    pub fn connect_timeout(mut self, t: Duration) -> Self {
        self.connect_timeout = t;
        self
    }

    /// Longest silence while waiting for the response or reading the stream
    /// (default 120 s); a stalled stream then ends with an interrupted error.
    #[must_use]
    pub fn read_timeout(mut self, t: Duration) -> Self {
        self.read_timeout = t;
        self
    }

    /// Retries of 429/5xx/connect failures before the stream starts (default 3).
    #[must_use]
    pub fn max_retries(mut self, n: u32) -> Self {
        self.retry.max_retries = n;
        self
    }

    /// First backoff between retries when the server gives no `Retry-After`
    /// (default 250 ms, doubling, at most 8 s, with jitter).
    #[must_use]
    pub fn retry_backoff(mut self, first: Duration) -> Self {
        self.retry.first_backoff = first;
        self
    }

    /// The longest `Retry-After` waited for (default 30 s); a server asking for
    /// more gets no retry and the error carries its `retry_after`.
    #[must_use]
    pub fn max_retry_after(mut self, max: Duration) -> Self {
        self.retry.max_retry_after = max;
        self
    }

    /// Whether to ask for usage (`stream_options.include_usage`, default on;
    /// turn off for servers that reject `stream_options`).
    #[must_use]
    pub fn include_usage(mut self, on: bool) -> Self {
        self.include_usage = on;
        self
    }

    /// An extra field of every request body (e.g. `temperature`,
    /// `max_completion_tokens`, or a server-specific option).
    #[must_use]
    pub fn body_field(mut self, name: impl Into<String>, value: Value) -> Self {
        self.extra_body.insert(name.into(), value);
        self
    }

    /// Builds the provider.
    pub fn build(self) -> Result<OpenAiProvider, ConfigError> {
        if !(self.base_url.starts_with("http://") || self.base_url.starts_with("https://")) {
            return Err(ConfigError::InvalidBaseUrl(self.base_url));
        }
        if self.api_key.is_none() && self.base_url == DEFAULT_BASE_URL {
            return Err(ConfigError::MissingApiKey(self.base_url));
        }
        // async-openai builds these headers with `unwrap`: check them here so a
        // bad value is a configuration error, not a panic at the first request.
        let key = self.api_key.clone().unwrap_or_default();
        check_header_value("authorization", &format!("Bearer {key}"))?;
        let org = self.organization.clone().unwrap_or_default();
        check_header_value("openai-organization", &org)?;
        let project = self.project.clone().unwrap_or_default();
        check_header_value("openai-project", &project)?;

        // Every field is set explicitly: `OpenAIConfig::new()` would otherwise
        // pick up OPENAI_* variables behind the caller's back.
        let mut config = OpenAIConfig::new()
            .with_api_base(&self.base_url)
            .with_api_key(key)
            .with_org_id(org)
            .with_project_id(project);
        for (k, v) in &self.headers {
            let name = HeaderName::from_bytes(k.as_bytes())
                .map_err(|_| ConfigError::InvalidHeader(k.clone()))?;
            check_header_value(k, v)?;
            config = config
                .with_header(name, v.as_str())
                .map_err(|_| ConfigError::InvalidHeader(k.clone()))?;
        }
        let http = http_client(self.connect_timeout, self.read_timeout)?;
        let mut secrets: Vec<String> = self.api_key.into_iter().collect();
        // Extra headers often carry keys too (`api-key`, `x-api-key`).
        secrets.extend(
            self.headers
                .iter()
                .filter(|(k, _)| {
                    k.to_ascii_lowercase().contains("key")
                        || k.eq_ignore_ascii_case("authorization")
                })
                .map(|(_, v)| v.clone()),
        );
        let redactor = Redactor::new(secrets);
        let transport = Transport::new(http, self.retry, redactor.clone());
        let client = async_openai::Client::with_config(config).with_http_service(transport);
        Ok(OpenAiProvider {
            name: format!("openai:{}", self.model),
            client,
            model: self.model,
            include_usage: self.include_usage,
            extra_body: (!self.extra_body.is_empty()).then(|| Arc::new(self.extra_body)),
            redactor,
        })
    }
}

fn check_header_value(name: &str, value: &str) -> Result<(), ConfigError> {
    HeaderValue::from_str(value)
        .map(|_| ())
        .map_err(|_| ConfigError::InvalidHeader(name.to_owned()))
}

#[cfg(target_arch = "wasm32")]
fn http_client(_connect: Duration, _read: Duration) -> Result<reqwest::Client, ConfigError> {
    // fetch has no connect or read timeouts; the Worker runtime bounds requests.
    reqwest::Client::builder()
        .build()
        .map_err(|e| ConfigError::HttpClient(e.to_string()))
}

#[cfg(not(target_arch = "wasm32"))]
fn http_client(connect: Duration, read: Duration) -> Result<reqwest::Client, ConfigError> {
    reqwest::Client::builder()
        .connect_timeout(connect)
        .read_timeout(read)
        .tcp_nodelay(true)
        .build()
        .map_err(|e| ConfigError::HttpClient(e.to_string()))
}

impl OpenAiProvider {
    /// A builder with defaults (api.openai.com, gpt-4o-mini).
    pub fn builder() -> OpenAiBuilder {
        OpenAiBuilder::default()
    }

    /// From `OPENAI_API_KEY`, `OPENAI_BASE_URL`, `OPENAI_MODEL`,
    /// `OPENAI_ORGANIZATION` (or `OPENAI_ORG_ID`) and `OPENAI_PROJECT` (or
    /// `OPENAI_PROJECT_ID`).
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    /// Like [`from_env`](Self::from_env), reading variables through `var`.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let var = |k: &str| var(k).filter(|v| !v.trim().is_empty());
        let mut b = Self::builder();
        if let Some(k) = var("OPENAI_API_KEY") {
            b = b.api_key(k.trim());
        }
        if let Some(u) = var("OPENAI_BASE_URL") {
            b = b.base_url(u.trim());
        }
        if let Some(m) = var("OPENAI_MODEL") {
            b = b.model(m.trim());
        }
        if let Some(o) = var("OPENAI_ORGANIZATION").or_else(|| var("OPENAI_ORG_ID")) {
            b = b.organization(o.trim());
        }
        if let Some(p) = var("OPENAI_PROJECT").or_else(|| var("OPENAI_PROJECT_ID")) {
            b = b.project(p.trim());
        }
        b.build()
    }

    /// The model name.
    pub fn model(&self) -> &str {
        &self.model
    }

    /// The request body of one step (what is sent to `/chat/completions`).
    pub fn request_body(&self, request: &ModelRequest) -> Value {
        let mut body = request_body(&self.model, request, self.include_usage);
        if let (Some(extra), Some(obj)) = (&self.extra_body, body.as_object_mut()) {
            for (k, v) in extra.iter() {
                obj.insert(k.clone(), v.clone());
            }
        }
        body
    }
}

/// Maps async-openai errors to chat-core's.
fn map_error(e: OpenAIError, redactor: &Redactor) -> ModelError {
    match e {
        OpenAIError::Boxed(b) => match b.downcast::<UpstreamError>() {
            Ok(up) => up.into_model_error(),
            Err(other) => ModelError::Other(redactor.clean(&other.to_string())),
        },
        OpenAIError::ApiError(r) => {
            let status = r.status_code.as_u16();
            let message = redactor.clean(&r.api_error.message);
            if crate::transport::is_retryable_status(status) {
                ModelError::Unavailable {
                    message: format!("{status}: {message}"),
                    retry_after: None,
                }
            } else {
                ModelError::Rejected { status, message }
            }
        }
        OpenAIError::Reqwest(e) => {
            let retryable = crate::transport::is_connect(&e) || (e.is_timeout() && !e.is_body());
            let message = redactor.clean(&e.without_url().to_string());
            if retryable {
                ModelError::Unavailable {
                    message,
                    retry_after: None,
                }
            } else {
                ModelError::Interrupted(message)
            }
        }
        OpenAIError::JSONDeserialize(e, raw) => {
            let mut raw = redactor.clean(&raw);
            crate::transport::truncate(&mut raw, 200);
            ModelError::Malformed(format!("{e} in {raw:?}"))
        }
        // An SSE framing error is the connection failing mid-stream.
        OpenAIError::StreamError(e) => ModelError::Interrupted(redactor.clean(&e.to_string())),
        OpenAIError::InvalidArgument(m) => ModelError::Other(redactor.clean(&m)),
        // Variants that exist on some targets only (file errors on native).
        #[allow(unreachable_patterns)]
        other => ModelError::Other(redactor.clean(&other.to_string())),
    }
}

/// One step's stream: upstream chunks in, model events out.
struct StepState {
    upstream: async_openai::types::stream::StreamResponse<StreamChunk>,
    mapper: StreamMapper,
    ended: bool,
    redactor: Redactor,
    model: String,
}

impl StepState {
    async fn next_event(&mut self) -> Option<Result<chat_core::ModelEvent, ModelError>> {
        loop {
            if let Some(ev) = self.mapper.pop() {
                if let Err(e) = &ev {
                    // After an error nothing else is handed out.
                    tracing::warn!(model = %self.model, error = %e, "model stream failed");
                    self.ended = true;
                    self.mapper = StreamMapper::new();
                }
                return Some(ev);
            }
            if self.ended {
                return None;
            }
            match self.upstream.next().await {
                Some(Ok(chunk)) => self.mapper.push(chunk),
                Some(Err(e)) if self.mapper.finished() => {
                    // The answer is complete; only the usage chunk or `[DONE]` is lost.
                    tracing::debug!(model = %self.model, error = %map_error(e, &self.redactor),
                        "model stream failed after its finish reason; ending the step");
                    self.ended = true;
                    self.mapper.end();
                }
                Some(Err(e)) => {
                    self.ended = true;
                    // A failure after the response started is never retried.
                    let e = match map_error(e, &self.redactor) {
                        ModelError::Unavailable { message, .. } => ModelError::Interrupted(message),
                        other => other,
                    };
                    self.mapper.fail(e);
                }
                None => {
                    self.ended = true;
                    self.mapper.end();
                }
            }
        }
    }
}

#[cfg_attr(target_arch = "wasm32", async_trait(?Send))]
#[cfg_attr(not(target_arch = "wasm32"), async_trait)]
impl ModelProvider for OpenAiProvider {
    async fn stream(&self, request: ModelRequest) -> Result<ModelStream, ModelError> {
        let body = self.request_body(&request);
        let upstream = self
            .client
            .chat()
            .create_stream_byot::<Value, StreamChunk>(body)
            .await
            .map_err(|e| {
                let e = map_error(e, &self.redactor);
                tracing::warn!(model = %self.model, step = request.step, error = %e, "model request failed");
                e
            })?;
        let state = StepState {
            upstream,
            mapper: StreamMapper::new(),
            ended: false,
            redactor: self.redactor.clone(),
            model: self.model.clone(),
        };
        // `unfold` owns the upstream stream: dropping the returned stream drops
        // it, which closes the channel async-openai reads the response into,
        // and its reader task then drops the connection at once.
        let events = futures::stream::unfold(state, |mut st| async move {
            let ev = st.next_event().await?;
            Some((ev, st))
        });
        Ok(Box::pin(events))
    }

    fn name(&self) -> &str {
        &self.name
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_errors_are_typed() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| (*v).to_owned())
            }
        };
        assert!(matches!(
            OpenAiProvider::from_vars(env(&[])),
            Err(ConfigError::MissingApiKey(_))
        ));
        // A local server needs no key.
        let p = OpenAiProvider::from_vars(env(&[
            ("OPENAI_BASE_URL", "http://127.0.0.1:11434/v1/"),
            ("OPENAI_MODEL", "llama3.1"),
        ]))
        .unwrap();
        assert_eq!(p.name(), "openai:llama3.1");
        assert!(matches!(
            OpenAiProvider::builder().api_key("sk\nx").build(),
            Err(ConfigError::InvalidHeader(_))
        ));
        assert!(matches!(
            OpenAiProvider::builder()
                .api_key("k")
                .header("bad header", "v")
                .build(),
            Err(ConfigError::InvalidHeader(_))
        ));
        assert!(matches!(
            OpenAiProvider::builder()
                .api_key("k")
                .base_url("localhost:8000")
                .build(),
            Err(ConfigError::InvalidBaseUrl(_))
        ));
        let b = OpenAiProvider::builder().api_key("sk-very-secret");
        assert!(!format!("{b:?}").contains("very-secret"));
    }

    #[test]
    fn extra_body_fields_are_merged() {
        let p = OpenAiProvider::builder()
            .api_key("k")
            .model("m")
            .include_usage(false)
            .body_field("temperature", serde_json::json!(0.2))
            .build()
            .unwrap();
        let body = p.request_body(&ModelRequest {
            system: None,
            messages: vec![].into(),
            tools: vec![],
            step: 0,
        });
        assert_eq!(body["temperature"], 0.2);
        assert!(body.get("stream_options").is_none());
        assert_eq!(body["stream"], true);
    }
}
