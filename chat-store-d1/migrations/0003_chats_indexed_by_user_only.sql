-- Every message write moves its chat's `updated_at` (user message, each
-- checkpoint, the final answer); with `updated_at` in an index each of those
-- also deleted and inserted an index entry. Indexed by user alone, only the
-- table row changes; listing a user's chats (far rarer than writing messages)
-- sorts that user's chats instead of reading them in index order.
DROP INDEX chats_user_updated;
CREATE INDEX chats_user ON chats (user_id);
