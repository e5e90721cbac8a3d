import { defineConfig } from 'vite';
import react from '@vitejs/plugin-react';

// `npm run dev` proxies the API to a chat server on :3000 (PORT=3000, the default);
// `npm run build` writes dist/, which the example server serves with WEB_DIR=dist.
export default defineConfig({
  plugins: [react()],
  server: {
    proxy: { '/api': 'http://127.0.0.1:3000' },
  },
});
