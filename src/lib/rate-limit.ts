import { createMiddleware } from "hono/factory";
import { AppError } from "./errors";
import { describeError, log } from "./log";
import type { AppEnv } from "../env";

// Per user, at most 20 state-changing requests (charge, coupon issue, order, cancel) per 10 s: the Workers
// Rate Limiting binding WRITE_RATE_LIMITER in wrangler.toml holds the numbers. Applied after `authenticate`
// and before anything else the route does (validation, the idempotency claim, objects, D1), so a refused
// request changes nothing, and every request counts, an idempotent replay included: telling a replay apart
// would take a D1 read. A refusal is never stored as an idempotent result, so the same key works once the
// window has passed. Admins are not limited (operators and the bench act through them).
//
// Failure: the limiter itself failing (an error from the binding, or no binding) lets the request through and
// logs an error: the limit guards against floods, while every invariant is kept by the objects and D1, so
// a limiter outage must not become an outage of every write.
export const limitWrites = createMiddleware<AppEnv>(async (c, next) => {
  const caller = c.get("caller");
  if (caller.role !== "admin" && !(await withinLimit(c.env, `user:${caller.userId}`, c.get("requestId")))) {
    throw new AppError("RATE_LIMITED", "Too many state-changing requests from this user; retry after Retry-After seconds");
  }
  await next();
});

async function withinLimit(env: Env, key: string, requestId: string): Promise<boolean> {
  try {
    return (await env.WRITE_RATE_LIMITER.limit({ key })).success;
  } catch (error) {
    log("error", "rate limiter unavailable; not limiting", { requestId, key, ...describeError(error) });
    return true;
  }
}
