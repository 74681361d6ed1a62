import { createRoute } from "@hono/zod-openapi";
import { bearer, createRouter, jsonResponse, problems } from "../lib/openapi";
import { positiveIntegerSetting } from "../lib/settings";
import { AuditSchema } from "./schemas";
import { runAudit } from "./service";

// Mounted under /api/admin, whose router authenticates and requires an admin for every route.
export const auditAdminRoutes = createRouter().openapi(
  createRoute({
    tags: ["Admin"],
    security: bearer,
    method: "get",
    path: "/",
    summary: "Check the service's invariants on the live data: wallet, coupons, stock, orders, exports",
    description:
      "O(rows): each check pages through its table and asks each coupon's and product's object once. `ok` is false when any check finds a violation; `samples` names up to 10 offending rows.",
    responses: { 200: jsonResponse(AuditSchema, "The audit"), ...problems(401, 403) },
  }),
  async (c) => {
    const report = await runAudit({
      db: c.env.DB,
      gates: c.env.COUPON_GATE,
      stocks: c.env.PRODUCT_STOCK,
      clock: c.get("clock"),
      redeliverAfterSeconds: positiveIntegerSetting("OUTBOX_REDELIVER_AFTER_SECONDS", c.env.OUTBOX_REDELIVER_AFTER_SECONDS, 1800),
    });
    return c.json(report, 200);
  },
);
