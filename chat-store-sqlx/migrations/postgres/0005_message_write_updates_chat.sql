-- The message write statement now advances its chats' sequence and activity
-- time itself (an insert in a data-modifying CTE, then one UPDATE of each
-- written chat from what it returned), still in one statement. The row
-- trigger of 0004 did the same with a PL/pgSQL call and an UPDATE per row.
DROP TRIGGER messages_touch_chat ON messages;
DROP FUNCTION message_touches_chat();
