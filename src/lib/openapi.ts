import { OpenAPIHono, z } from "@hono/zod-openapi";
import type { Hook } from "@hono/zod-openapi";
import { AppError, ERRORS } from "./errors";
import type { Context, TypedResponse } from "hono";
import type { AppEnv } from "../env";

// Every validation failure, from any route, becomes the same 400 VALIDATION_FAILED problem.
const validationHook: Hook<unknown, AppEnv, string, unknown> = (result, c) => {
  // Every body here is a required JSON body. Without a Content-Type, Hono's validator would check `{}`
  // instead, so a body whose fields are all optional (a coupon issue) would pass with no body at all.
  if (result.target === "json" && !c.req.header("Content-Type")) {
    throw new AppError("UNSUPPORTED_MEDIA_TYPE", "Send the body as application/json");
  }
  if (!result.success) throw validationFailed(result.error.issues);
};

/** The 400 VALIDATION_FAILED problem for zod's issues; `at` names what was checked when the issues do not. */
export function validationFailed(issues: readonly z.core.$ZodIssue[], at = "(body)"): AppError {
  const errors = issues.map((issue) => ({ path: issue.path.map(String).join(".") || at, message: issue.message }));
  return new AppError("VALIDATION_FAILED", "The request did not pass validation", errors);
}

export function createRouter() {
  return new OpenAPIHono<AppEnv>({ defaultHook: validationHook });
}

export const ProblemSchema = z
  .object({
    type: z.string(),
    title: z.string(),
    status: z.number().int(),
    code: z.enum(Object.keys(ERRORS) as [keyof typeof ERRORS, ...(keyof typeof ERRORS)[]]),
    detail: z.string(),
    requestId: z.string(),
    errors: z.array(z.object({ path: z.string(), message: z.string() })).optional(),
  })
  .openapi("Problem");

/**
 * An integer in a path or query string: decimal digits only. (`z.coerce` would also take "1e3", "0x10"
 * or " 1", so one resource would answer to many spellings.)
 */
export function decimalInteger(min: number, max: number) {
  return z
    .string()
    .regex(/^(0|[1-9][0-9]*)$/, "Decimal digits only, without leading zeros")
    .transform(Number)
    .pipe(z.number().min(min).max(max))
    .openapi({ type: "integer", minimum: min, maximum: max });
}

export const Id = decimalInteger(1, Number.MAX_SAFE_INTEGER).openapi({ example: 1 });

/** An id in a JSON body: a JSON number, never a string. */
export const PositiveId = z.number().int().min(1).max(Number.MAX_SAFE_INTEGER).openapi({ example: 1 });

/**
 * A display name (user, product, coupon): no control characters anywhere (checked before trimming, so a
 * trailing newline is refused rather than silently cut), then trimmed to 1..maxLength characters.
 */
export function Name(maxLength: number) {
  return z
    .string()
    .regex(/^[^\u0000-\u001F\u007F-\u009F\u2028\u2029]*$/, "Must not contain control characters or line separators")
    .trim()
    .min(1)
    .max(maxLength);
}

export const Timestamp = z.string().openapi({ example: "2026-11-23T08:15:30.123Z", format: "date-time" });

export function jsonBody<T extends z.ZodTypeAny>(schema: T, description?: string) {
  return { required: true, description, content: { "application/json": { schema } } } as const;
}

export function jsonResponse<T extends z.ZodTypeAny>(schema: T, description: string) {
  return { description, content: { "application/json": { schema } } } as const;
}

const problemResponse = (description: string) =>
  ({ description, content: { "application/problem+json": { schema: ProblemSchema } } }) as const;

/** The problem responses a route can give, for the OpenAPI document (500 is possible on every route). */
export function problems(...statuses: (400 | 401 | 403 | 404 | 409 | 413 | 415 | 422 | 429 | 503)[]) {
  const described: Record<number, string> = {
    400: "Invalid input or a business rule refused the request",
    401: "Missing, malformed, expired or wrongly signed token",
    403: "The caller may not do this",
    404: "Not found",
    409: "Conflict with the current state",
    413: "Body over 1 MiB",
    415: "Body is not JSON",
    422: "Idempotency key reused with another request",
    429: "RATE_LIMITED: too many state-changing requests from this user; nothing happened; retry after the Retry-After header's seconds",
    503: "A dependency is overloaded or unreachable; nothing was held; retry after the Retry-After header's seconds",
    500: "Something failed on the server; the problem carries the requestId to quote",
  };
  // Any route may meet D1 unreachable (503) or a fault of ours (500).
  return Object.fromEntries([...new Set([...statuses, 503, 500])].map((s) => [s, problemResponse(described[s]!)]));
}

export const bearer = [{ bearerAuth: [] }];

const KEY_MIN = 1;
const KEY_MAX = 255;
const PRINTABLE_ASCII = /^[\x20-\x7E]+$/;

export const IdempotencyKey = z.string().min(KEY_MIN).max(KEY_MAX).regex(PRINTABLE_ASCII, "1..255 printable ASCII characters");

/**
 * The `Idempotency-Key` header, for a route's `parameters`: documented only, and checked by the route's
 * `checkIdempotencyKey` middleware (./idempotency.ts) against `IdempotencyKey`. As `request.headers` it
 * would add a validator that copies every header of every write to find this one.
 */
export const idempotencyKeyParameter = {
  in: "header",
  name: "idempotency-key",
  required: false,
  description: "Replays the first result for the same key, caller and body within 24 h",
  schema: { type: "string", minLength: KEY_MIN, maxLength: KEY_MAX, pattern: PRINTABLE_ASCII.source },
} as const;

/**
 * Sends JSON text that is already serialised (rendered by SQLite, or read from a cache) without parsing
 * it again. The type parameter is the schema the text satisfies, so the route stays typed.
 */
export function jsonText<T>(c: Context<AppEnv>, text: string): Response & TypedResponse<T, 200, "json"> {
  return c.body(text, 200, { "Content-Type": "application/json" }) as unknown as Response & TypedResponse<T, 200, "json">;
}
