import type { Context, MiddlewareHandler } from "hono";
import { matchedRoutes } from "hono/route";
import type { AppEnv } from "../env";
import { describeError, log } from "./log";
import { PROBLEM_CONTENT_TYPE } from "./problem";

// One Workers Analytics Engine data point per request, on the METRICS binding (README, "Metrics"):
//   index1 = blob1  the route template, as the OpenAPI document writes it (`/api/orders/{orderId}/cancel`),
//                   or "unmatched" when no route matched (a 404 for an unknown path)
//   blob2           the method
//   blob3           the problem `code` of an error response, "" for a success
//   double1         the status
//   double2         the duration in milliseconds, up to the response being ready
// Written after the response is built; writeDataPoint does not wait for the write, and a failure here is
// logged, never the request's. Locally Miniflare accepts the writes and drops them.

export const UNMATCHED_ROUTE = "unmatched";

export function requestMetrics(): MiddlewareHandler<AppEnv> {
  return async (c, next) => {
    const started = performance.now();
    await next();
    const durationMs = performance.now() - started;
    try {
      const route = routeTemplate(c);
      const code = c.get("problemCode") ?? (await problemCodeOf(c.res));
      c.env.METRICS.writeDataPoint({ indexes: [route], blobs: [route, c.req.method, code], doubles: [c.res.status, durationMs] });
    } catch (error) {
      log("warn", "metrics: data point not written", describeError(error));
    }
  };
}

/** The matched route's path with `{name}` parameters; middleware (method ALL) is not a route. */
export function routeTemplate(c: Context): string {
  const route = matchedRoutes(c).findLast((r) => r.method !== "ALL");
  return route ? route.path.replace(/:(\w+)(\{[^}]*\})?/g, "{$1}") : UNMATCHED_ROUTE;
}

/** The code of a problem response not built in this request (an idempotent replay of a stored one). */
async function problemCodeOf(res: Response): Promise<string> {
  if (!res.headers.get("Content-Type")?.startsWith(PROBLEM_CONTENT_TYPE)) return "";
  const body = (await res.clone().json().catch(() => null)) as { code?: unknown } | null;
  return typeof body?.code === "string" ? body.code : "";
}
