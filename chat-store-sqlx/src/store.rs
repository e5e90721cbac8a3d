//! The `MessageStore` implementation, written once and instantiated for each
//! backend by `message_store_impl!` with that backend's SQL dialect bits.

/// Largest encoded message (parts + metadata) accepted, in bytes.
pub const DEFAULT_MAX_ROW_BYTES: usize = 4 * 1024 * 1024;

/// Implements `chat_core::MessageStore` for `$store` (which has `reader()`,
/// `writer()` and `max_row_bytes`). Every statement is scoped by user id in SQL.
macro_rules! message_store_impl {
    ($store:ty, db = $db:ty, pool = $pool:ty, greatest = $greatest:literal, lookup = $lookup:ident, numbered = $numbered:literal, touch_chats = $touch:literal, lanes = $lanes:literal, hold = $hold:ident) => {
        /// Group commit of message writes over this backend's writer pool.
        #[derive(Debug)]
        pub(crate) struct BatchWriter {
            pool: $pool,
            held: $crate::batch::HeldConnections<$db>,
        }

        impl BatchWriter {
            /// A batch writer on `pool`.
            pub(crate) fn new(pool: $pool) -> Self {
                Self {
                    pool,
                    held: $crate::batch::HeldConnections::new($crate::batch::HoldPolicy::$hold),
                }
            }

            /// The upsert statement for `rows` rows (one of `CHUNK_SIZES`), built once.
            fn upsert_sql(rows: usize) -> Option<&'static str> {
                static SQL: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
                let sql = SQL.get_or_init(|| {
                    $crate::batch::CHUNK_SIZES
                        .iter()
                        .map(|&n| $crate::batch::upsert_sql(
                            n,
                            $crate::batch::ChatLookup::$lookup,
                            $numbered,
                            $touch,
                        ))
                        .collect()
                });
                let at = $crate::batch::CHUNK_SIZES.iter().position(|&n| n == rows)?;
                Some(sql[at].as_str())
            }
        }

        #[async_trait::async_trait]
        impl $crate::batch::RowWriter for BatchWriter {
            async fn write_rows(
                &self,
                jobs: &[$crate::batch::Job],
            ) -> Result<u64, chat_core::StoreError> {
                let size = $crate::batch::padded(jobs.len());
                let sql = BatchWriter::upsert_sql(size).ok_or_else(|| {
                    chat_core::StoreError::Invalid(format!(
                        "batch of {} rows is over the limit",
                        jobs.len()
                    ))
                })?;
                let mut q = sqlx::query(sql);
                for j in jobs {
                    q = q
                        .bind(&j.row.id)
                        .bind(&j.chat)
                        .bind(j.user.as_str())
                        .bind(j.row.role)
                        .bind(&j.row.content)
                        .bind(j.row.metadata.as_deref())
                        .bind(j.row.status)
                        .bind(j.row.finish_reason)
                        .bind(j.row.created_at)
                        .bind(j.row.updated_at);
                }
                // Padding: an empty chat id matches no chat, so these rows write nothing.
                for _ in jobs.len()..size {
                    q = q
                        .bind("")
                        .bind("")
                        .bind("")
                        .bind("user")
                        .bind("")
                        .bind(None::<&str>)
                        .bind("complete")
                        .bind(None::<&str>)
                        .bind(0_i64)
                        .bind(0_i64);
                }
                let (mut conn, since) = self.held.take(&self.pool).await?;
                let done = q.execute(&mut *conn).await.map_err($crate::error::map)?;
                self.held.keep(conn, since);
                Ok(done.rows_affected())
            }

            async fn owns(
                &self,
                user: &chat_core::UserId,
                chat: &str,
            ) -> Result<bool, chat_core::StoreError> {
                // SQLite's writer pool is one connection: the one this writer may hold.
                self.held.release();
                let row = sqlx::query("SELECT 1 AS one FROM chats WHERE id = $1 AND user_id = $2")
                    .bind(chat)
                    .bind(user.as_str())
                    .fetch_optional(&self.pool)
                    .await
                    .map_err($crate::error::map)?;
                Ok(row.is_some())
            }

            fn lanes(&self) -> usize {
                $lanes
            }

            fn idle(&self) {
                self.held.release();
            }

            fn idle_grace(&self) -> std::time::Duration {
                self.held.idle_grace()
            }
        }

        #[async_trait::async_trait]
        impl chat_core::MessageStore for $store {
            async fn create_chat(
                &self,
                user: &chat_core::UserId,
                new: chat_core::NewChat,
            ) -> Result<chat_core::Chat, chat_core::StoreError> {
                let id = new.id.to_string();
                sqlx::query(
                    "INSERT INTO chats (id, user_id, title, created_at, updated_at) \
                     VALUES ($1, $2, $3, $4, $4)",
                )
                .bind(&id)
                .bind(user.as_str())
                .bind(new.title.as_deref())
                .bind(new.created_at)
                .execute(self.writer())
                .await
                .map_err($crate::error::map)?;
                Ok(chat_core::Chat {
                    id: new.id,
                    user_id: user.clone(),
                    title: new.title,
                    created_at: new.created_at,
                    updated_at: new.created_at,
                })
            }

            async fn list_chats(
                &self,
                user: &chat_core::UserId,
                page: chat_core::PageRequest,
            ) -> Result<chat_core::ChatPage, chat_core::StoreError> {
                use sqlx::Row as _;
                let limit = i64::from(page.limit.clamp(1, 1000));
                let rows = match page.cursor {
                    None => sqlx::query(
                        "SELECT id, user_id, title, created_at, updated_at FROM chats \
                         WHERE user_id = $1 ORDER BY updated_at DESC, id DESC LIMIT $2",
                    )
                    .bind(user.as_str())
                    .bind(limit + 1)
                    .fetch_all(self.reader())
                    .await,
                    Some(c) => sqlx::query(
                        "SELECT id, user_id, title, created_at, updated_at FROM chats \
                         WHERE user_id = $1 AND (updated_at < $2 OR (updated_at = $2 AND id < $3)) \
                         ORDER BY updated_at DESC, id DESC LIMIT $4",
                    )
                    .bind(user.as_str())
                    .bind(c.updated_at)
                    .bind(c.id.to_string())
                    .bind(limit + 1)
                    .fetch_all(self.reader())
                    .await,
                }
                .map_err($crate::error::map)?;
                let mut chats = Vec::with_capacity(rows.len());
                for r in &rows {
                    chats.push($crate::schema::chat(
                        r.try_get("id").map_err($crate::error::map)?,
                        r.try_get("user_id").map_err($crate::error::map)?,
                        r.try_get("title").map_err($crate::error::map)?,
                        r.try_get("created_at").map_err($crate::error::map)?,
                        r.try_get("updated_at").map_err($crate::error::map)?,
                    )?);
                }
                let more = chats.len() as i64 > limit;
                chats.truncate(limit as usize);
                let next_cursor = if more { chats.last().map(chat_core::ChatCursor::after) } else { None };
                Ok(chat_core::ChatPage { chats, next_cursor })
            }

            async fn get_chat(
                &self,
                user: &chat_core::UserId,
                chat: &chat_core::ChatId,
            ) -> Result<chat_core::Chat, chat_core::StoreError> {
                use sqlx::Row as _;
                let row = sqlx::query(
                    "SELECT id, user_id, title, created_at, updated_at FROM chats \
                     WHERE id = $1 AND user_id = $2",
                )
                .bind(chat.to_string())
                .bind(user.as_str())
                .fetch_optional(self.reader())
                .await
                .map_err($crate::error::map)?
                .ok_or(chat_core::StoreError::NotFound)?;
                $crate::schema::chat(
                    row.try_get("id").map_err($crate::error::map)?,
                    row.try_get("user_id").map_err($crate::error::map)?,
                    row.try_get("title").map_err($crate::error::map)?,
                    row.try_get("created_at").map_err($crate::error::map)?,
                    row.try_get("updated_at").map_err($crate::error::map)?,
                )
            }

            async fn delete_chat(
                &self,
                user: &chat_core::UserId,
                chat: &chat_core::ChatId,
            ) -> Result<(), chat_core::StoreError> {
                // One statement: the messages go with the chat through ON DELETE CASCADE.
                let done = sqlx::query("DELETE FROM chats WHERE id = $1 AND user_id = $2")
                    .bind(chat.to_string())
                    .bind(user.as_str())
                    .execute(self.writer())
                    .await
                    .map_err($crate::error::map)?;
                if done.rows_affected() == 0 {
                    return Err(chat_core::StoreError::NotFound);
                }
                Ok(())
            }

            async fn load_messages(
                &self,
                user: &chat_core::UserId,
                chat: &chat_core::ChatId,
            ) -> Result<Vec<chat_core::StoredMessage>, chat_core::StoreError> {
                use sqlx::Row as _;
                // One scoped query: no row = no such chat (for this user);
                // one row with NULL message columns = an empty chat.
                let rows = sqlx::query(
                    "SELECT m.id, m.role, m.content, m.metadata, m.status, m.created_at, m.updated_at \
                     FROM chats c LEFT JOIN messages m ON m.chat_id = c.id \
                     WHERE c.id = $1 AND c.user_id = $2 ORDER BY m.seq",
                )
                .bind(chat.to_string())
                .bind(user.as_str())
                .fetch_all(self.reader())
                .await
                .map_err($crate::error::map)?;
                if rows.is_empty() {
                    return Err(chat_core::StoreError::NotFound);
                }
                let mut out = Vec::with_capacity(rows.len());
                for r in &rows {
                    let Some(id) = r.try_get::<Option<&str>, _>("id").map_err($crate::error::map)? else {
                        continue;
                    };
                    out.push($crate::schema::decode(
                        id,
                        r.try_get("role").map_err($crate::error::map)?,
                        r.try_get("content").map_err($crate::error::map)?,
                        r.try_get("metadata").map_err($crate::error::map)?,
                        r.try_get("status").map_err($crate::error::map)?,
                        r.try_get("created_at").map_err($crate::error::map)?,
                        r.try_get("updated_at").map_err($crate::error::map)?,
                    )?);
                }
                Ok(out)
            }

            async fn upsert_message(
                &self,
                user: &chat_core::UserId,
                chat: &chat_core::ChatId,
                message: &chat_core::StoredMessage,
            ) -> Result<(), chat_core::StoreError> {
                self.upsert(user, chat, message, None).await
            }

            async fn set_title_if_unset(
                &self,
                user: &chat_core::UserId,
                chat: &chat_core::ChatId,
                title: &str,
            ) -> Result<bool, chat_core::StoreError> {
                let done = sqlx::query(
                    "UPDATE chats SET title = $3 WHERE id = $1 AND user_id = $2 AND title IS NULL",
                )
                .bind(chat.to_string())
                .bind(user.as_str())
                .bind(title)
                .execute(self.writer())
                .await
                .map_err($crate::error::map)?;
                if done.rows_affected() == 1 {
                    return Ok(true);
                }
                // Tell "already titled" from "not yours / not there".
                self.get_chat(user, chat).await.map(|_| false)
            }

            async fn touch(
                &self,
                user: &chat_core::UserId,
                chat: &chat_core::ChatId,
                at: i64,
            ) -> Result<(), chat_core::StoreError> {
                let done = sqlx::query(concat!(
                    "UPDATE chats SET updated_at = ", $greatest, "(updated_at, $3) ",
                    "WHERE id = $1 AND user_id = $2"
                ))
                .bind(chat.to_string())
                .bind(user.as_str())
                .bind(at)
                .execute(self.writer())
                .await
                .map_err($crate::error::map)?;
                if done.rows_affected() == 0 {
                    return Err(chat_core::StoreError::NotFound);
                }
                Ok(())
            }

            fn supports_fencing(&self) -> bool {
                true
            }

            async fn upsert_message_fenced(
                &self,
                user: &chat_core::UserId,
                chat: &chat_core::ChatId,
                message: &chat_core::StoredMessage,
                fence: u64,
            ) -> Result<(), chat_core::StoreError> {
                self.upsert(user, chat, message, Some(fence)).await
            }
        }

        impl $store {
            /// Insert-or-replace-in-place of a message, scoped by user. An
            /// unfenced write goes through the group-commit queue (one
            /// multi-row statement for whatever is queued; see `batch`); the
            /// chat's sequence and activity time advance in the same
            /// statement (SQLite: triggers; Postgres: the statement's own
            /// update of each written chat). An update in place
            /// keeps its seq and created_at. A fenced write first raises the
            /// chat's fence under the chat row's lock, in one transaction.
            async fn upsert(
                &self,
                user: &chat_core::UserId,
                chat: &chat_core::ChatId,
                message: &chat_core::StoredMessage,
                fence: Option<u64>,
            ) -> Result<(), chat_core::StoreError> {
                let row = $crate::schema::encode(message, self.max_row_bytes)?;
                let chat_id = chat.to_string();
                let Some(fence) = fence else {
                    return self.queue.write(user, chat_id, row).await;
                };
                let one_row = BatchWriter::upsert_sql(1).ok_or_else(|| {
                    chat_core::StoreError::Invalid("no one-row upsert statement".into())
                })?;
                let insert = sqlx::query(one_row)
                .bind(&row.id)
                .bind(&chat_id)
                .bind(user.as_str())
                .bind(row.role)
                .bind(&row.content)
                .bind(row.metadata.as_deref())
                .bind(row.status)
                .bind(row.finish_reason)
                .bind(row.created_at)
                .bind(row.updated_at);
                let fence = i64::try_from(fence).unwrap_or(i64::MAX);
                let mut tx = self.writer().begin().await.map_err($crate::error::map)?;
                // No row: not this user's chat, or a newer fencing token was seen.
                let raised = sqlx::query(concat!(
                    "UPDATE chats SET fence = ", $greatest, "(fence, $3) ",
                    "WHERE id = $1 AND user_id = $2 AND fence <= $3"
                ))
                .bind(&chat_id)
                .bind(user.as_str())
                .bind(fence)
                .execute(&mut *tx)
                .await
                .map_err($crate::error::map)?;
                if raised.rows_affected() == 0 {
                    drop(tx);
                    return Err(match self.rejected(user, &chat_id, &row.id).await {
                        chat_core::StoreError::Conflict(_) => chat_core::StoreError::Fenced,
                        other => other,
                    });
                }
                let written = insert.execute(&mut *tx).await.map_err($crate::error::map)?;
                if written.rows_affected() == 0 {
                    // The dropped transaction rolls the fence raise back.
                    drop(tx);
                    return Err(self.rejected(user, &chat_id, &row.id).await);
                }
                tx.commit().await.map_err($crate::error::map)?;
                Ok(())
            }

            /// Why a scoped message write changed nothing (the error path only).
            async fn rejected(
                &self,
                user: &chat_core::UserId,
                chat_id: &str,
                message_id: &str,
            ) -> chat_core::StoreError {
                $crate::batch::rejected(self.queue.writer(), user, chat_id, message_id).await
            }
        }
    };
}

pub(crate) use message_store_impl;
