/// <reference types="vitest/config" />
import { defineConfig } from "vite";
import vue from "@vitejs/plugin-vue";

export default defineConfig({
  plugins: [vue()],
  build: {
    // Served by poold with a strict content security policy: no inline scripts.
    modulePreload: { polyfill: false },
    chunkSizeWarningLimit: 1024,
  },
  test: {
    include: ["test/**/*.test.ts"],
  },
});
