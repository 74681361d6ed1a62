import type { Context } from "hono";
import { toProblem, type AppError } from "./errors";
import type { AppEnv } from "../env";

export const PROBLEM_CONTENT_TYPE = "application/problem+json";

/** The one way an AppError becomes an HTTP response (app.onError and stored idempotent results). */
export function problemResponse(c: Context<AppEnv>, error: AppError): Response {
  const requestId = c.get("requestId") ?? "unknown";
  return c.body(JSON.stringify(toProblem(error, requestId)), error.status, {
    "Content-Type": PROBLEM_CONTENT_TYPE,
  });
}
