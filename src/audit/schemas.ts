import { z } from "@hono/zod-openapi";
import { Timestamp } from "../lib/openapi";
import { MAX_SAMPLES } from "./check";

const SampleSchema = z
  .record(z.string(), z.union([z.number(), z.string(), z.null()]))
  .openapi({ description: "One offending row: its id (userId, couponId, productId, orderId or exportId), `kind` where a check has several rules, and the numbers that disagree", example: { userId: 42, balance: 5_000, ledger: 4_000, newest: 4_000 } });

const AuditCheckSchema = z
  .object({
    name: z.enum(["wallet", "coupons", "stock", "orders", "exports"]),
    ok: z.boolean(),
    checked: z.number().int().openapi({ description: "Rows examined: users (wallet), coupons, products (stock), orders, exports" }),
    violations: z.number().int().openapi({ description: "Broken rules found, one per row and rule" }),
    samples: z.array(SampleSchema).max(MAX_SAMPLES),
    details: z.record(z.string(), z.number().int()).openapi({
      description:
        "Reported, not judged: objectsAgreed, objectsIdle (not live), objectsBusy (entries or batches in flight), objectsUnreachable, objectsNotAsked; pending, failed and sent exports; notReached (rows past this call's budget)",
      example: { objectsAgreed: 12, objectsIdle: 3 },
    }),
  })
  .openapi("AuditCheck");

export const AuditSchema = z
  .object({
    ok: z.boolean().openapi({ description: "False when any check found a violation" }),
    checkedAt: Timestamp,
    checks: z.array(AuditCheckSchema),
  })
  .openapi("Audit");
