//! `ModelProvider` for OpenAI and every OpenAI-compatible server (vLLM,
//! Ollama, LiteLLM, Azure-style gateways...), on async-openai.
//!
//! ```no_run
//! # fn demo() -> Result<(), chat_llm_openai::ConfigError> {
//! use chat_llm_openai::OpenAiProvider;
//! let model = OpenAiProvider::builder()
//!     .api_key("sk-...")
//!     .base_url("http://localhost:11434/v1") // e.g. Ollama
//!     .model("llama3.1")
//!     .build()?;
//! // or: OpenAiProvider::from_env()? (OPENAI_API_KEY, OPENAI_BASE_URL, OPENAI_MODEL)
//! # Ok(()) }
//! ```
#![deny(missing_docs)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

/// The README's example is compiled as a doc test.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;

mod mapping;
mod provider;
mod transport;

pub use mapping::{
    ChunkChoice, ChunkDelta, ChunkUsage, FunctionDelta, StreamChunk, StreamMapper, ToolCallDelta,
    finish_reason, request_body,
};
pub use provider::{ConfigError, DEFAULT_BASE_URL, DEFAULT_MODEL, OpenAiBuilder, OpenAiProvider};
