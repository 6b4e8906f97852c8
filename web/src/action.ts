// A button's call: busy while it runs, and the API's own words next to it when it fails.
import { ref } from "vue";
import { explain } from "./api";

export function useAction() {
  const busy = ref(false);
  const error = ref("");
  async function act(what: string, call: () => Promise<unknown>): Promise<boolean> {
    busy.value = true;
    error.value = "";
    try {
      await call();
      return true;
    } catch (e) {
      error.value = `${what}: ${explain(e)}`;
      return false;
    } finally {
      busy.value = false;
    }
  }
  return { busy, error, act };
}
