import pluginVue from "eslint-plugin-vue";
import { defineConfigWithVueTs, vueTsConfigs } from "@vue/eslint-config-typescript";

export default defineConfigWithVueTs(
  { ignores: ["dist/**", "src/gen/**", "e2e/gen/**", "node_modules/**"] },
  pluginVue.configs["flat/essential"],
  vueTsConfigs.recommended,
  {
    rules: {
      eqeqeq: "error",
      "no-console": ["error", { allow: ["warn", "error"] }],
    },
  },
  {
    // The browser test is a Node script that reports what it does.
    files: ["e2e/**"],
    rules: { "no-console": "off", "no-redeclare": "error" },
  },
);
