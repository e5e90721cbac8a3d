//! Pool settings shared by the backends.

use std::time::Duration;

use sqlx::pool::PoolOptions;

/// A pooled connection idle this long is pinged before it is handed out.
/// Younger ones were pinged when they came back to the pool, moments ago:
/// only a server that went away within this window fails a statement
/// instead of being replaced (HikariCP's bypass window is 500 ms).
pub(crate) const PING_IF_IDLE_FOR: Duration = Duration::from_secs(1);

/// `options` with connections checked before use only once they sat idle
/// [`PING_IF_IDLE_FOR`]. sqlx pings every connection that comes back to the
/// pool and, by default, again before handing it out: each statement run on
/// a pooled connection paid a second round trip (to the Postgres server, or
/// to SQLite's connection thread) for a connection checked moments before.
pub(crate) fn checked_when_stale<DB: sqlx::Database>(options: PoolOptions<DB>) -> PoolOptions<DB> {
    options
        .test_before_acquire(false)
        .before_acquire(|conn, meta| {
            Box::pin(async move {
                if meta.idle_for >= PING_IF_IDLE_FOR {
                    sqlx::Connection::ping(conn).await?;
                }
                Ok(true)
            })
        })
}
