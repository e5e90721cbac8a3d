// The api.md routes this page uses, and the user it acts as.
import { DefaultChatTransport } from 'ai';

/**
 * The user id sent as `x-user-id` (the example server's dev-header auth):
 * `?user=NAME` in the address sets it; otherwise one random id per browser.
 */
export function currentUser() {
  const fromUrl = new URLSearchParams(window.location.search).get('user');
  if (fromUrl) localStorage.setItem('chat-user', fromUrl);
  let user = localStorage.getItem('chat-user');
  if (!user) {
    user = `user-${crypto.randomUUID().slice(0, 8)}`;
    localStorage.setItem('chat-user', user);
  }
  return user;
}

const USER = currentUser();
export const authHeaders = { 'x-user-id': USER };

async function call(method, path, body) {
  const res = await fetch(path, {
    method,
    headers: body === undefined ? authHeaders : { ...authHeaders, 'content-type': 'application/json' },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const json = await res.json().catch(() => ({}));
  if (!res.ok) throw new Error(json.error ?? `${method} ${path}: ${res.status}`);
  return json;
}

export const listChats = () => call('GET', '/api/chat').then((r) => r.chats);
export const createChat = () => call('POST', '/api/chat', {}).then((r) => r.chatId);
export const deleteChat = (id) => call('DELETE', `/api/chat/${id}`);
export const loadMessages = (id) => call('GET', `/api/chat/${id}/messages`).then((r) => r.messages);
export const stopChat = (id) => call('POST', `/api/chat/${id}/stop`);

/**
 * useChat's transport, pointed at the api.md routes: only the new message
 * goes to the server (history lives there); resume is GET /api/chat/:id/stream.
 */
export const transport = new DefaultChatTransport({
  api: '/api/chat',
  headers: authHeaders,
  prepareSendMessagesRequest: ({ id, messages, trigger, messageId }) => ({
    api: `/api/chat/${id}/messages`,
    body:
      trigger === 'regenerate-message'
        ? { id, message: messages.at(-1), trigger, messageId }
        : { id, message: messages.at(-1) },
  }),
  prepareReconnectToStreamRequest: ({ id }) => ({ api: `/api/chat/${id}/stream` }),
});

export { USER };
