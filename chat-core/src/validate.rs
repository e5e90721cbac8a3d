//! Input limits and validation of incoming user messages.

use crate::error::{Error, ValidationError};
use crate::message::{Part, Role, UiMessage};

/// Limits on what clients may send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest total text of one user message, in bytes (default 32 KiB).
    pub max_message_text_bytes: usize,
    /// Most parts in one user message (default 64).
    pub max_parts: usize,
    /// Longest title given at creation, in bytes (default 512).
    pub max_title_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_message_text_bytes: 32 * 1024,
            max_parts: 64,
            max_title_bytes: 512,
        }
    }
}

impl Limits {
    /// Checks a user message from a client before anything is stored:
    /// role `user`, 1..=`max_parts` parts of the kinds a user may send
    /// (text, file, `data-*`), non-blank text within `max_message_text_bytes`.
    pub fn check_user_message(&self, msg: &UiMessage) -> Result<(), Error> {
        if msg.role != Role::User {
            return Err(ValidationError::new("message.role", "must be \"user\"").into());
        }
        if msg.parts.is_empty() {
            return Err(ValidationError::new("message.parts", "must not be empty").into());
        }
        if msg.parts.len() > self.max_parts {
            return Err(ValidationError::new(
                "message.parts",
                format!("at most {} parts", self.max_parts),
            )
            .into());
        }
        let mut text_bytes = 0usize;
        let mut blank = true;
        for part in &msg.parts {
            match part {
                Part::Text(t) => {
                    text_bytes += t.text.len();
                    blank &= t.text.trim().is_empty();
                }
                Part::File { .. } => {}
                Part::Other(m)
                    if m.get("type")
                        .and_then(serde_json::Value::as_str)
                        .is_some_and(|t| t.starts_with("data-")) => {}
                other => {
                    return Err(ValidationError::new(
                        "message.parts",
                        format!(
                            "a user message cannot contain `{}` parts",
                            other.type_name()
                        ),
                    )
                    .into());
                }
            }
        }
        if text_bytes > self.max_message_text_bytes {
            return Err(Error::TooLarge {
                what: "message text",
                size: text_bytes,
                limit: self.max_message_text_bytes,
            });
        }
        if blank {
            return Err(ValidationError::new("message.parts", "message text is empty").into());
        }
        Ok(())
    }

    /// Checks a title given at chat creation; returns it trimmed (`None` if blank).
    pub fn check_title(&self, title: Option<&str>) -> Result<Option<String>, Error> {
        let Some(t) = title.map(str::trim).filter(|t| !t.is_empty()) else {
            return Ok(None);
        };
        if t.len() > self.max_title_bytes {
            return Err(Error::TooLarge {
                what: "title",
                size: t.len(),
                limit: self.max_title_bytes,
            });
        }
        Ok(Some(t.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::MessageId;
    use crate::message::{ToolPart, ToolState};

    #[test]
    fn rejects_bad_user_messages() {
        let l = Limits::default();
        let ok = UiMessage::user_text(MessageId::new(), "hi");
        assert!(l.check_user_message(&ok).is_ok());
        let empty = UiMessage::user_text(MessageId::new(), "  \n ");
        assert!(matches!(
            l.check_user_message(&empty),
            Err(Error::Invalid(_))
        ));
        let big = UiMessage::user_text(MessageId::new(), "x".repeat(32 * 1024 + 1));
        assert!(matches!(
            l.check_user_message(&big),
            Err(Error::TooLarge { .. })
        ));
        let mut asst = ok.clone();
        asst.role = Role::Assistant;
        assert!(l.check_user_message(&asst).is_err());
        let mut no_parts = ok.clone();
        no_parts.parts.clear();
        assert!(l.check_user_message(&no_parts).is_err());
        let mut tool = ok.clone();
        tool.parts.push(Part::Tool(ToolPart {
            tool_name: "x".into(),
            dynamic: false,
            tool_call_id: "c".into(),
            state: ToolState::InputAvailable,
            input: None,
            output: None,
            error_text: None,
            provider_executed: None,
        }));
        assert!(l.check_user_message(&tool).is_err());
    }
}
