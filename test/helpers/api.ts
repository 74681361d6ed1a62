import { createExecutionContext, waitOnExecutionContext } from "cloudflare:test";
import { env, exports } from "cloudflare:workers";
import { signToken, type Role } from "../../src/lib/auth";
import type { App } from "../../src/app";

export const SECRET = env.JWT_SECRET;

export function tokenFor(sub: string | number, role: Role = "user", expiresInSeconds = 3600): Promise<string> {
  return signToken(SECRET, { sub: String(sub), role }, expiresInSeconds, Date.now());
}

export const adminToken = () => tokenFor("0", "admin");

export interface CallOptions {
  token?: string;
  body?: unknown;
  headers?: Record<string, string>;
  /** Run against an app built by the test (for example with a fixed clock) instead of the Worker. */
  app?: App;
}

export interface ApiResponse<T = any> {
  status: number;
  headers: Headers;
  body: T;
  text: string;
}

/** One HTTP call through the real Worker (or a test-built app), JSON in and out. */
export async function call<T = any>(method: string, path: string, options: CallOptions = {}): Promise<ApiResponse<T>> {
  const headers = new Headers(options.headers);
  if (options.token) headers.set("Authorization", `Bearer ${options.token}`);
  let body: string | undefined;
  if (options.body !== undefined) {
    body = typeof options.body === "string" ? options.body : JSON.stringify(options.body);
    if (!headers.has("Content-Type")) headers.set("Content-Type", "application/json");
  }
  const request = new Request(`http://shop.test${path}`, { method, headers, body });
  let response: Response;
  if (options.app) {
    const ctx = createExecutionContext();
    response = await options.app.fetch(request, env, ctx);
    await waitOnExecutionContext(ctx);
  } else {
    response = await exports.default.fetch(request);
  }
  const text = await response.text();
  let parsed: unknown = undefined;
  try {
    parsed = text ? JSON.parse(text) : undefined;
  } catch {
    parsed = undefined;
  }
  return { status: response.status, headers: response.headers, body: parsed as T, text };
}

export function expectProblem(res: ApiResponse, status: number, code: string): void {
  if (res.status !== status || res.body?.code !== code) {
    throw new Error(`expected ${status} ${code}, got ${res.status} ${res.text}`);
  }
  if (!res.headers.get("content-type")?.startsWith("application/problem+json")) {
    throw new Error(`expected application/problem+json, got ${res.headers.get("content-type")}`);
  }
  for (const field of ["type", "title", "status", "code", "detail", "requestId"]) {
    if (!(field in res.body)) throw new Error(`problem lacks ${field}: ${res.text}`);
  }
}
