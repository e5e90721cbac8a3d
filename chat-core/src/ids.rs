//! Identifiers. Chat and generated message ids are UUID v4 (122 random bits);
//! all ids are stored as TEXT.

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::error::ValidationError;

/// Longest accepted id, in bytes.
pub const MAX_ID_LEN: usize = 128;

fn is_id_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '@' | '-')
}

fn check_id(field: &'static str, s: &str) -> Result<(), ValidationError> {
    if s.is_empty() || s.len() > MAX_ID_LEN {
        return Err(ValidationError::new(
            field,
            format!("must be 1 to {MAX_ID_LEN} characters"),
        ));
    }
    if !s.chars().all(is_id_char) {
        return Err(ValidationError::new(
            field,
            "may contain only letters, digits and _ . @ -",
        ));
    }
    Ok(())
}

/// The authenticated owner of chats: 1..=128 chars of `[A-Za-z0-9_.@-]`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct UserId(Arc<str>);

impl UserId {
    /// Validates and wraps a user id.
    pub fn new(s: impl AsRef<str>) -> Result<Self, ValidationError> {
        let s = s.as_ref();
        check_id("userId", s)?;
        Ok(Self(Arc::from(s)))
    }

    /// The id as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "UserId({})", self.0)
    }
}

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A chat's id: a server-generated UUID v4, in its hyphenated lowercase form.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChatId(uuid::Uuid);

impl ChatId {
    /// A new random chat id.
    pub fn new() -> Self {
        Self(uuid::Uuid::new_v4())
    }

    /// Parses a chat id from a URL segment; anything but a UUID is rejected.
    pub fn parse(s: &str) -> Result<Self, ValidationError> {
        uuid::Uuid::try_parse(s)
            .map(Self)
            .map_err(|_| ValidationError::new("chatId", "must be a UUID"))
    }

    /// The underlying UUID.
    pub fn uuid(&self) -> uuid::Uuid {
        self.0
    }
}

impl Default for ChatId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for ChatId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChatId({})", self.0)
    }
}

impl fmt::Display for ChatId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0.hyphenated(), f)
    }
}

impl Serialize for ChatId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&self.0.hyphenated())
    }
}

impl<'de> Deserialize<'de> for ChatId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        ChatId::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// A message id: client-chosen for user messages (the AI SDK generates them),
/// server-generated UUID v4 for assistant messages. 1..=128 chars of `[A-Za-z0-9_.@-]`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct MessageId(Arc<str>);

impl MessageId {
    /// A new random message id (UUID v4).
    pub fn new() -> Self {
        Self(Arc::from(uuid::Uuid::new_v4().to_string()))
    }

    /// Validates and wraps a message id.
    pub fn parse(s: impl AsRef<str>) -> Result<Self, ValidationError> {
        let s = s.as_ref();
        check_id("message.id", s)?;
        Ok(Self(Arc::from(s)))
    }

    /// The id as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for MessageId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MessageId({})", self.0)
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for MessageId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        MessageId::parse(&*s).map_err(serde::de::Error::custom)
    }
}

impl<'de> Deserialize<'de> for UserId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        UserId::new(&*s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chat_ids_are_random_uuids() {
        let a = ChatId::new();
        let b = ChatId::new();
        assert_ne!(a, b);
        assert_eq!(a.uuid().get_version_num(), 4);
        assert_eq!(ChatId::parse(&a.to_string()).unwrap(), a);
        assert!(ChatId::parse("not-a-uuid").is_err());
        assert!(ChatId::parse("../etc").is_err());
    }

    #[test]
    fn user_and_message_ids_are_validated() {
        assert!(UserId::new("alice@example.com").is_ok());
        assert!(UserId::new("").is_err());
        assert!(UserId::new("a:b").is_err());
        assert!(UserId::new("x".repeat(129)).is_err());
        assert!(MessageId::parse("aB3-_x").is_ok());
        assert!(MessageId::parse("has space").is_err());
        assert_eq!(MessageId::new().as_str().len(), 36);
    }
}
