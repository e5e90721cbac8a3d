-- Set once a follower on any instance watches the turn: only then does
-- publishing a frame NOTIFY (NOTIFY serializes commits database-wide).
ALTER TABLE chat_leases ADD COLUMN watched BOOLEAN NOT NULL DEFAULT FALSE;
