import { createExecutionContext, waitOnExecutionContext } from "cloudflare:test";
import { env } from "cloudflare:workers";
import type { App } from "../../src/app";

/**
 * The Worker's bindings with a D1 that counts the statements whose SQL matches `pattern`, and a way to send
 * a request to an app with them. Every request shares this isolate's cache, as concurrent requests do.
 */
export function countingD1(pattern: RegExp) {
  let count = 0;
  const DB = new Proxy(env.DB, {
    get(target, property) {
      if (property === "prepare") {
        return (query: string) => {
          if (pattern.test(query)) count++;
          return target.prepare(query);
        };
      }
      const value = Reflect.get(target, property);
      return typeof value === "function" ? value.bind(target) : value;
    },
  });
  const bindings: Env = { ...env, DB };
  return {
    count: () => count,
    /** A GET through `app` with the counting bindings; resolves once its waitUntil work has settled. */
    async get(app: App, path: string): Promise<{ status: number; text: string }> {
      const ctx = createExecutionContext();
      const response = await app.fetch(new Request(`http://shop.test${path}`), bindings, ctx);
      const text = await response.text();
      await waitOnExecutionContext(ctx);
      return { status: response.status, text };
    },
  };
}
