import type { Context } from "hono";
import { toProblem, type AppError } from "./errors";
import type { AppEnv } from "../env";

export const PROBLEM_CONTENT_TYPE = "application/problem+json";

/**
 * When to come back. A 503: the dependencies behind it (objects, D1) recover in about a second. A 429: the
 * rate limit's period (WRITE_RATE_LIMITER's `period` in wrangler.toml), after which its window has passed.
 */
const RETRY_AFTER_SECONDS: Partial<Record<number, string>> = { 429: "10", 503: "1" };

/** The one way an AppError becomes an HTTP response (app.onError and stored idempotent results). */
export function problemResponse(c: Context<AppEnv>, error: AppError): Response {
  const requestId = c.get("requestId") ?? "unknown";
  const retryAfter = RETRY_AFTER_SECONDS[error.status];
  c.set("problemCode", error.code);
  return c.body(JSON.stringify(toProblem(error, requestId)), error.status, {
    "Content-Type": PROBLEM_CONTENT_TYPE,
    ...(retryAfter ? { "Retry-After": retryAfter } : {}),
  });
}
