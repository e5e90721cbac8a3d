-- Chats and their messages. Ids are TEXT (UUIDs); times are epoch milliseconds.
CREATE TABLE chats (
    id          TEXT    PRIMARY KEY NOT NULL,
    user_id     TEXT    NOT NULL,
    title       TEXT,
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL,
    -- last message sequence number handed out (ordering never depends on clocks)
    next_seq    INTEGER NOT NULL DEFAULT 0,
    -- highest fencing token seen (multi-instance coordination)
    fence       INTEGER NOT NULL DEFAULT 0
);

-- A user's chats, most recently updated first (keyset pagination).
CREATE INDEX chats_user_updated ON chats (user_id, updated_at DESC, id DESC);

CREATE TABLE messages (
    id            TEXT    PRIMARY KEY NOT NULL,
    chat_id       TEXT    NOT NULL REFERENCES chats (id) ON DELETE CASCADE,
    seq           INTEGER NOT NULL,
    role          TEXT    NOT NULL,
    -- JSON array of UIMessage parts
    content       TEXT    NOT NULL,
    -- JSON object (createdAt, finishReason, usage) or NULL
    metadata      TEXT,
    -- 'complete' or 'streaming' (a checkpoint of a running or crashed turn)
    status        TEXT    NOT NULL,
    finish_reason TEXT,
    created_at    INTEGER NOT NULL,
    updated_at    INTEGER NOT NULL
);

-- A chat's messages in order.
CREATE UNIQUE INDEX messages_chat_seq ON messages (chat_id, seq);
