-- Writing a message advances its chat's sequence and activity time inside the
-- same statement, so a message write is one statement (no transaction round
-- trips) and the chat can never fall behind its messages.
CREATE FUNCTION message_touches_chat() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE chats SET next_seq = GREATEST(next_seq, NEW.seq),
                     updated_at = GREATEST(updated_at, NEW.updated_at)
    WHERE id = NEW.chat_id;
    RETURN NULL;
END
$$;

CREATE TRIGGER messages_touch_chat AFTER INSERT OR UPDATE ON messages
    FOR EACH ROW EXECUTE FUNCTION message_touches_chat();
