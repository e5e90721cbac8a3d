import { useCallback, useEffect, useRef, useState } from 'react';
import { useChat } from '@ai-sdk/react';
import {
  USER,
  createChat,
  deleteChat,
  listChats,
  loadMessages,
  stopChat,
  transport,
} from './api.js';

/** The open chat lives in the address (`#<chatId>`), so a reload keeps it. */
const chatFromHash = () => window.location.hash.slice(1) || null;

export default function App() {
  const [chats, setChats] = useState([]);
  const [current, setCurrent] = useState(chatFromHash);
  const [problem, setProblem] = useState(null);

  const refresh = useCallback(() => {
    listChats()
      .then(setChats)
      .catch((e) => setProblem(e.message));
  }, []);

  useEffect(() => {
    refresh();
    const onHash = () => setCurrent(chatFromHash());
    window.addEventListener('hashchange', onHash);
    return () => window.removeEventListener('hashchange', onHash);
  }, [refresh]);

  const open = (id) => {
    window.location.hash = id ?? '';
    setCurrent(id);
  };

  const newChat = async () => {
    try {
      const id = await createChat();
      refresh();
      open(id);
    } catch (e) {
      setProblem(e.message);
    }
  };

  const remove = async (id) => {
    try {
      await deleteChat(id);
      if (id === current) open(null);
      refresh();
    } catch (e) {
      setProblem(e.message);
    }
  };

  return (
    <div className="app">
      <aside className="sidebar">
        <button type="button" data-testid="new-chat" onClick={newChat}>
          + New chat
        </button>
        <nav data-testid="chat-list">
          {chats.map((c) => (
            <div
              key={c.id}
              className={c.id === current ? 'chat-item active' : 'chat-item'}
              data-testid="chat-item"
              data-chat-id={c.id}
            >
              <button type="button" className="chat-title" onClick={() => open(c.id)}>
                {c.title ?? 'New chat'}
              </button>
              <button
                type="button"
                className="chat-delete"
                data-testid="delete-chat"
                title="Delete chat"
                onClick={() => remove(c.id)}
              >
                ×
              </button>
            </div>
          ))}
        </nav>
        <footer className="user" data-testid="user">
          {USER}
        </footer>
      </aside>
      <main className="main">
        {problem && (
          <div className="problem" role="alert" onClick={() => setProblem(null)}>
            {problem}
          </div>
        )}
        {current ? (
          <ChatLoader key={current} chatId={current} onActivity={refresh} />
        ) : (
          <div className="empty">
            <p>Start a new chat.</p>
            <button type="button" onClick={newChat}>
              + New chat
            </button>
          </div>
        )}
      </main>
    </div>
  );
}

/** Loads the chat's stored history, then hands it to useChat. */
function ChatLoader({ chatId, onActivity }) {
  const [history, setHistory] = useState(null);
  const [problem, setProblem] = useState(null);
  useEffect(() => {
    loadMessages(chatId)
      .then(setHistory)
      .catch((e) => setProblem(e.message));
  }, [chatId]);
  if (problem) return <div className="empty">{problem}</div>;
  if (!history) return <div className="empty">Loading…</div>;
  return <ChatView chatId={chatId} initial={history} onActivity={onActivity} />;
}

function ChatView({ chatId, initial, onActivity }) {
  const { messages, sendMessage, status, stop, error, clearError } = useChat({
    id: chatId,
    messages: initial,
    transport,
    // A reload during an answer picks it up again from GET /api/chat/:id/stream.
    resume: true,
    onFinish: () => onActivity(),
  });
  const [input, setInput] = useState('');
  const statusRef = useRef(status);
  statusRef.current = status;
  const busy = status === 'submitted' || status === 'streaming';

  // The title is set when the first message is stored: refresh the sidebar.
  useEffect(() => {
    if (status === 'streaming') onActivity();
  }, [status, onActivity]);

  const end = useRef(null);
  useEffect(() => {
    end.current?.scrollIntoView({ block: 'end' });
  }, [messages]);

  const submit = (e) => {
    e.preventDefault();
    const text = input.trim();
    if (!text || busy) return;
    if (error) clearError();
    sendMessage({ text });
    setInput('');
  };

  // Stop on the server (a closed connection alone lets the answer go on);
  // the stream then ends with an `abort` chunk and keeps what was generated.
  const onStop = async () => {
    try {
      await stopChat(chatId);
    } catch {
      stop();
      return;
    }
    setTimeout(() => {
      if (statusRef.current === 'streaming' || statusRef.current === 'submitted') stop();
    }, 2000);
  };

  return (
    <section className="chat" data-testid="chat" data-status={status}>
      <div className="messages" data-testid="messages">
        {messages.map((m) => (
          <Message key={m.id} message={m} />
        ))}
        {error && (
          <div className="error" data-testid="error" role="alert">
            {error.message}
          </div>
        )}
        <div ref={end} />
      </div>
      <form className="composer" onSubmit={submit}>
        <input
          data-testid="composer-input"
          value={input}
          placeholder="Send a message (try [reasoning], [tool], [error])"
          onChange={(e) => setInput(e.target.value)}
          autoFocus
        />
        {busy ? (
          <button type="button" data-testid="stop" onClick={onStop}>
            Stop
          </button>
        ) : (
          <button type="submit" data-testid="send" disabled={!input.trim()}>
            Send
          </button>
        )}
      </form>
    </section>
  );
}

function Message({ message }) {
  return (
    <div className={`message ${message.role}`} data-testid={`message-${message.role}`} data-message-id={message.id}>
      {message.parts.map((part, i) => (
        <Part key={i} part={part} />
      ))}
    </div>
  );
}

function Part({ part }) {
  if (part.type === 'text') {
    return (
      <p className="text" data-testid="part-text">
        {part.text}
      </p>
    );
  }
  if (part.type === 'reasoning') {
    return (
      <details className="reasoning" data-testid="part-reasoning">
        <summary>Reasoning</summary>
        {part.text}
      </details>
    );
  }
  if (part.type.startsWith('tool-') || part.type === 'dynamic-tool') {
    const name = part.type === 'dynamic-tool' ? part.toolName : part.type.slice(5);
    return (
      <div className="tool" data-testid="part-tool" data-state={part.state}>
        <strong>{name}</strong> <code>{JSON.stringify(part.input ?? {})}</code>
        {part.state === 'output-available' && (
          <>
            {' → '}
            <code>{JSON.stringify(part.output)}</code>
          </>
        )}
        {part.state === 'output-error' && <span className="error"> {part.errorText}</span>}
      </div>
    );
  }
  return null;
}
