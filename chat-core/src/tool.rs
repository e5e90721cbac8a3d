//! Tools the model can call between steps.

use std::sync::Arc;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::ToolError;
use crate::ids::{ChatId, UserId};

/// A tool's description as sent to the model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ToolSpec {
    /// Name the model calls it by (`[A-Za-z0-9_-]`).
    pub name: String,
    /// What it does, for the model.
    pub description: String,
    /// JSON Schema of its input.
    pub input_schema: Value,
}

/// Who is calling a tool.
#[derive(Debug, Clone)]
pub struct ToolContext {
    /// The chat's owner.
    pub user: UserId,
    /// The chat.
    pub chat: ChatId,
    /// The model's id for this call.
    pub tool_call_id: String,
}

/// A function the model may call. Executed by the turn between model steps.
#[cfg_attr(target_arch = "wasm32", async_trait(?Send))]
#[cfg_attr(not(target_arch = "wasm32"), async_trait)]
pub trait Tool: crate::MaybeSendSync + 'static {
    /// The description sent to the model.
    fn spec(&self) -> ToolSpec;

    /// Runs the tool. An error is reported to the model and the client as a
    /// tool error; the turn continues.
    async fn call(&self, ctx: ToolContext, input: Value) -> Result<Value, ToolError>;
}

/// The tools of a chat service, by name.
#[derive(Clone, Default)]
pub struct ToolSet {
    tools: Vec<Arc<dyn Tool>>,
}

impl std::fmt::Debug for ToolSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.tools.iter().map(|t| t.spec().name))
            .finish()
    }
}

impl ToolSet {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a tool.
    #[must_use]
    pub fn with(mut self, tool: impl Tool) -> Self {
        self.tools.push(Arc::new(tool));
        self
    }

    /// The tool called `name`.
    pub fn get(&self, name: &str) -> Option<&Arc<dyn Tool>> {
        self.tools.iter().find(|t| t.spec().name == name)
    }

    /// Specs of all tools.
    pub fn specs(&self) -> Vec<ToolSpec> {
        self.tools.iter().map(|t| t.spec()).collect()
    }

    /// True when there are no tools.
    pub fn is_empty(&self) -> bool {
        self.tools.is_empty()
    }
}
