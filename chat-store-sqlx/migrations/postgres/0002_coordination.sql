-- Multi-instance coordination (PgCoordinator, feature `coordination`): one
-- lease row per running turn, and the SSE frames of running turns so any
-- instance can replay and follow them. Unused without that feature.

-- Fencing tokens: strictly increasing across all chats and instances.
CREATE SEQUENCE chat_lease_tokens;

CREATE TABLE chat_leases (
    chat_id     TEXT        PRIMARY KEY NOT NULL,
    token       BIGINT      NOT NULL,
    -- the running turn's assistant message id, once announced
    message_id  TEXT,
    -- on the database clock, so instances never compare their own clocks
    expires_at  TIMESTAMPTZ NOT NULL,
    -- another instance asked the holder to stop
    stop        BOOLEAN     NOT NULL DEFAULT FALSE
);

CREATE TABLE turn_frames (
    id          BIGINT      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    chat_id     TEXT        NOT NULL,
    token       BIGINT      NOT NULL,
    -- one SSE frame; NULL marks the end of the turn's stream
    frame       BYTEA,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp()
);

-- A turn's frames in order (replay and follow).
CREATE INDEX turn_frames_turn ON turn_frames (chat_id, token, id);
-- The sweep of ended turns.
CREATE INDEX turn_frames_created ON turn_frames (created_at);
