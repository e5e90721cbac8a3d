//! The chat title rule.

/// Longest title prefix, in Unicode scalar values.
pub const TITLE_CHARS: usize = 50;

/// The title for a chat whose first user message is `text`: its first 50
/// Unicode scalar values, trimmed, plus `...` when the text was longer.
/// Returns `None` when nothing but whitespace remains.
///
/// ```
/// assert_eq!(chat_core::title_from_text("  Hello there "), Some("Hello there".to_owned()));
/// let long = "é".repeat(60);
/// assert_eq!(chat_core::title_from_text(&long), Some(format!("{}...", "é".repeat(50))));
/// ```
pub fn title_from_text(text: &str) -> Option<String> {
    let cut = text
        .char_indices()
        .nth(TITLE_CHARS)
        .map_or(text.len(), |(i, _)| i);
    let longer = cut < text.len();
    let head = text[..cut].trim();
    if head.is_empty() {
        return None;
    }
    let mut title = String::with_capacity(head.len() + 3);
    title.push_str(head);
    if longer {
        title.push_str("...");
    }
    Some(title)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn exact_rule() {
        assert_eq!(title_from_text(&"a".repeat(50)), Some("a".repeat(50)));
        assert_eq!(
            title_from_text(&"a".repeat(51)),
            Some(format!("{}...", "a".repeat(50)))
        );
        assert_eq!(title_from_text("   "), None);
        // Trimming happens after the cut, like the seed's `slice(0, 50).trim()`.
        let s = format!("{}  tail", "b".repeat(49));
        assert_eq!(title_from_text(&s), Some(format!("{}...", "b".repeat(49))));
        assert_eq!(title_from_text("👋🏽 hi"), Some("👋🏽 hi".to_owned()));
    }

    proptest! {
        #[test]
        fn never_splits_or_overflows(s in any::<String>()) {
            if let Some(t) = title_from_text(&s) {
                let body = t.strip_suffix("...").unwrap_or(&t);
                prop_assert!(body.chars().count() <= TITLE_CHARS);
                prop_assert!(s.starts_with(body.trim_start()) || s.trim_start().starts_with(body));
                prop_assert_eq!(t.ends_with("...") && !body.ends_with("..."), s.chars().count() > TITLE_CHARS);
            }
        }
    }
}
