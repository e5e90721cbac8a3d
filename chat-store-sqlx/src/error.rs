//! Mapping of sqlx errors to chat-core's `StoreError`.

use chat_core::StoreError;

/// Classifies a sqlx error: transient failures (I/O, pool exhaustion, busy or
/// locked SQLite, Postgres shutdowns and serialization failures) are
/// retryable; unique violations are conflicts; the rest is a backend error.
pub(crate) fn map(e: sqlx::Error) -> StoreError {
    use sqlx::Error as E;
    match &e {
        E::Io(_) | E::PoolTimedOut | E::PoolClosed | E::WorkerCrashed | E::Tls(_) => {
            StoreError::unavailable(e)
        }
        E::Database(db) => {
            let code = db
                .code()
                .map(std::borrow::Cow::into_owned)
                .unwrap_or_default();
            if db.is_unique_violation() {
                StoreError::Conflict("duplicate key".into())
            } else if is_transient(&code) {
                StoreError::unavailable(e)
            } else {
                StoreError::backend(e)
            }
        }
        _ => StoreError::backend(e),
    }
}

/// Postgres SQLSTATEs are always five characters (some all digits, like
/// `08006`); SQLite result codes are decimal numbers of at most four digits.
///
/// SQLite: 5 BUSY, 6 LOCKED (and their extended codes, e.g. 261, 517).
/// Postgres: class 08 connection exceptions, 40001 serialization failure,
/// 40P01 deadlock, 53xxx insufficient resources, 57P0x shutdowns.
fn is_transient(code: &str) -> bool {
    if code.len() != 5
        && let Ok(n) = code.parse::<i32>()
    {
        return matches!(n & 0xff, 5 | 6);
    }
    code.starts_with("08")
        || code.starts_with("53")
        || matches!(code, "40001" | "40P01" | "57P01" | "57P02" | "57P03")
}

#[cfg(test)]
mod tests {
    use super::is_transient;

    #[test]
    fn transient_codes() {
        assert!(is_transient("5"));
        assert!(is_transient("517"));
        assert!(!is_transient("19"));
        assert!(is_transient("57P01"));
        assert!(is_transient("08006"));
        assert!(!is_transient("23505"));
        assert!(is_transient("53300"));
        assert!(is_transient("40001"));
        assert!(!is_transient("1555"));
    }
}
