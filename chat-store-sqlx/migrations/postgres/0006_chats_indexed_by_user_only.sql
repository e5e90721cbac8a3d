-- Every message write moves its chat's `updated_at` (user message, each
-- checkpoint, the final answer). With `updated_at` in an index each of those
-- was a non-HOT update: a new entry in both chat indexes and a dead tuple per
-- message write. Indexed by user alone, the update stays on its heap page and
-- no index changes; listing a user's chats (far rarer than writing messages)
-- sorts that user's chats instead of reading them in index order.
DROP INDEX chats_user_updated;
CREATE INDEX chats_user ON chats (user_id);
