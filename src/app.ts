import { bodyLimit } from "hono/body-limit";
import { HTTPException } from "hono/http-exception";
import { requestId } from "hono/request-id";
import { secureHeaders } from "hono/secure-headers";
import { adminRoutes } from "./admin/routes";
import { catalogRoutes } from "./catalog/routes";
import { couponRoutes } from "./coupons/routes";
import { orderRoutes } from "./orders/routes";
import { walletRoutes } from "./wallet/routes";
import { createDb } from "./db/client";
import { isD1Unavailable } from "./db/errors";
import { AppError } from "./lib/errors";
import { problemResponse } from "./lib/problem";
import { systemClock, type Clock } from "./lib/clock";
import { describeError, log } from "./lib/log";
import { requestMetrics } from "./lib/metrics";
import { withRequestId } from "./lib/request-context";
import { createRouter } from "./lib/openapi";
import { healthRoutes } from "./health";
import { docsRoutes } from "./docs";

export interface AppOptions {
  clock?: Clock;
}

const MAX_BODY_BYTES = 1024 * 1024;

function fromHttpException(error: HTTPException): AppError {
  switch (error.status) {
    case 400:
      return new AppError("MALFORMED_JSON", error.message);
    case 413:
      return new AppError("PAYLOAD_TOO_LARGE", "The request body is over 1 MiB");
    case 415:
      return new AppError("UNSUPPORTED_MEDIA_TYPE", "Send the body as application/json");
    case 401:
      return new AppError("UNAUTHENTICATED");
    default:
      return new AppError("INTERNAL");
  }
}

export function createApp(options: AppOptions = {}) {
  const clock = options.clock ?? systemClock;
  const app = createRouter();

  app.use(requestId({ limitLength: 64 }));
  // Every log line of the request, and of the work it leaves behind (waitUntil), carries its id.
  app.use((c, next) => withRequestId(c.get("requestId"), next));
  app.use(requestMetrics());
  app.use(secureHeaders());
  app.use(async (c, next) => {
    c.set("clock", clock);
    c.set("db", createDb(c.env.DB));
    await next();
  });
  app.use(
    bodyLimit({
      maxSize: MAX_BODY_BYTES,
      onError: () => {
        throw new AppError("PAYLOAD_TOO_LARGE", "The request body is over 1 MiB");
      },
    }),
  );

  app.route("/", healthRoutes);
  // Feature routers mounted at /api carry full paths and authenticate per route (never `use("*")`,
  // which would also cover the public catalog).
  app.route("/api/admin", adminRoutes);
  app.route("/api/products", catalogRoutes);
  app.route("/api", walletRoutes);
  app.route("/api", couponRoutes);
  app.route("/api", orderRoutes);

  app.openAPIRegistry.registerComponent("securitySchemes", "bearerAuth", {
    type: "http",
    scheme: "bearer",
    bearerFormat: "JWT",
  });
  app.doc31("/openapi.json", {
    openapi: "3.1.0",
    info: {
      title: "Edge Shop API",
      version: "1.0.0",
      description: "Wallet, catalog, first-come-first-served coupons and orders on Cloudflare Workers.",
    },
  });
  app.route("/", docsRoutes);

  app.notFound((c) => problemResponse(c, new AppError("NOT_FOUND", `No route for ${c.req.method} ${c.req.path}`)));

  app.onError((error, c) => {
    if (error instanceof AppError) return problemResponse(c, error);
    if (error instanceof HTTPException) {
      const mapped = fromHttpException(error);
      if (mapped.code !== "INTERNAL") return problemResponse(c, mapped);
    }
    // D1 unreachable or overloaded on a path that does not answer it itself (a read, a claim, an unkeyed
    // write): a 503 with Retry-After, not a 500. A keyed write whose outcome is unknown answers its own 503
    // and keeps its claim; an unkeyed one may or may not have been applied, which the detail says.
    if (isD1Unavailable(error)) {
      log("warn", "D1 unavailable", { requestId: c.get("requestId"), method: c.req.method, path: c.req.path, ...describeError(error) });
      return problemResponse(
        c,
        new AppError(
          "SERVICE_UNAVAILABLE",
          "The database cannot be reached right now; a write may or may not have been applied: retry it with the same Idempotency-Key",
        ),
      );
    }
    log("error", "unhandled error", {
      requestId: c.get("requestId"),
      method: c.req.method,
      path: c.req.path,
      ...describeError(error),
    });
    return problemResponse(c, new AppError("INTERNAL", "Something went wrong on our side; quote the requestId"));
  });

  return app;
}

export type App = ReturnType<typeof createApp>;
