import { z } from "@hono/zod-openapi";
import { Timestamp } from "../lib/openapi";
import { MAX_SAMPLES, MAX_SHARDED_FIGURES } from "./check";

const SampleSchema = z
  .record(z.string(), z.union([z.number(), z.string(), z.null()]))
  .openapi({ description: "One offending row: its id (userId, couponId, productId, orderId or exportId), `kind` where a check has several rules, and the numbers that disagree", example: { userId: 42, balance: 5_000, ledger: 4_000, newest: 4_000 } });

const PerShard = (description: string) => z.array(z.number().int().nullable()).openapi({ description: `Per shard, in shard order: ${description}; null where the shard was not live or did not answer` });

const ShardedCouponSchema = z
  .object({
    couponId: z.number().int(),
    shards: z.number().int(),
    issuedCount: z.number().int().openapi({ description: "D1's issued_count: the shards' issued, summed, once every shard is settled" }),
    gate: z.enum(["agrees", "disagrees", "busy", "idle", "unreachable"]).openapi({ description: "What the audit made of its shards together" }),
    issued: PerShard("issued and still being committed there"),
    quota: PerShard("pieces it may hold (null also before its first request)"),
    pending: PerShard("admissions being committed"),
    requests: PerShard("issue requests it received since it last started"),
    transfersGiven: PerShard("quota transfers it gave"),
    piecesGiven: PerShard("pieces it gave in them"),
    openIntents: PerShard("transfers to it not yet settled"),
  })
  .openapi("AuditShardedCoupon", { description: "One sharded coupon's shards (docs/sharded-coupons.md)" });

const AuditCheckSchema = z
  .object({
    name: z.enum(["wallet", "coupons", "stock", "orders", "exports"]),
    ok: z.boolean(),
    checked: z.number().int().openapi({ description: "Rows examined: users (wallet), coupons, products (stock), orders, exports" }),
    violations: z.number().int().openapi({ description: "Broken rules found, one per row and rule" }),
    samples: z.array(SampleSchema).max(MAX_SAMPLES),
    details: z.record(z.string(), z.union([z.number().int(), z.array(ShardedCouponSchema).max(MAX_SHARDED_FIGURES)])).openapi({
      description:
        "Reported, not judged: objectsAgreed, objectsIdle (not live), objectsBusy (entries or batches in flight), objectsUnreachable, objectsNotAsked (objects: a coupon of N shards is N gates); pending, failed and sent exports; notReached (rows past this call's budget). The coupons check adds `shardedCoupons`, the shards' figures of the first " +
        `${MAX_SHARDED_FIGURES} sharded coupons it asked (by id), and shardedCouponsNotListed, how many more it asked`,
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
