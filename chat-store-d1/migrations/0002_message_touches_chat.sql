-- Writing a message advances its chat's sequence and activity time inside the
-- same statement, so a message write is one statement (no transaction round
-- trips) and the chat can never fall behind its messages.
CREATE TRIGGER messages_insert_touches_chat AFTER INSERT ON messages
BEGIN
    UPDATE chats SET next_seq = MAX(next_seq, NEW.seq), updated_at = MAX(updated_at, NEW.updated_at)
    WHERE id = NEW.chat_id;
END;

CREATE TRIGGER messages_update_touches_chat AFTER UPDATE ON messages
BEGIN
    UPDATE chats SET updated_at = MAX(updated_at, NEW.updated_at) WHERE id = NEW.chat_id;
END;
