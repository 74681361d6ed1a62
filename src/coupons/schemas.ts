import { z } from "@hono/zod-openapi";
import { BALANCE_LIMIT } from "../db/schema";
import { Id, Name, PositiveId, Timestamp } from "../lib/openapi";
import { MAX_SHARDS } from "./shards";

export const MAX_COUPON_QUANTITY = 1_000_000;
export const MAX_MIN_ORDER_AMOUNT = 100_000_000;
export const MAX_VALID_DAYS = 3650;

const DiscountType = z.enum(["FIXED", "PERCENT"]);
const EARLIEST_INSTANT = Date.UTC(1970, 0, 1);
const LATEST_INSTANT = Date.UTC(9999, 11, 31, 23, 59, 59, 999);

/** Any ISO 8601 offset, normalised to the contract's UTC form; the range keeps that form's 4-digit year. */
const Instant = z.iso
  .datetime({ offset: true })
  .refine((instant) => {
    const ms = Date.parse(instant);
    return ms >= EARLIEST_INSTANT && ms <= LATEST_INSTANT;
  }, "Must be from 1970-01-01T00:00:00.000Z to 9999-12-31T23:59:59.999Z")
  .transform((instant) => new Date(instant).toISOString())
  .openapi({
    example: "2026-11-23T00:00:00.000Z",
    description: "ISO 8601 with an offset, years 1970..9999; stored and returned as UTC",
  });

export const CreateCouponBody = z
  .strictObject({
    name: Name(100),
    discountType: DiscountType,
    discountValue: z
      .number()
      .int()
      .min(1)
      .max(BALANCE_LIMIT)
      .openapi({ description: "FIXED: won off (1..10,000,000); PERCENT: percent off (1..100)" }),
    totalQuantity: z.number().int().min(1).max(MAX_COUPON_QUANTITY),
    minOrderAmount: z.number().int().min(0).max(MAX_MIN_ORDER_AMOUNT).default(0),
    maxDiscountAmount: z
      .number()
      .int()
      .min(1)
      .max(BALANCE_LIMIT)
      .optional()
      .openapi({ description: "PERCENT only: the discount never passes this many won (1..10,000,000); none when left out" }),
    issueStartsAt: Instant.optional().openapi({ description: "First instant it may be issued (inclusive)" }),
    issueEndsAt: Instant.optional().openapi({ description: "Last instant it may be issued (inclusive)" }),
    validDays: z.number().int().min(1).max(MAX_VALID_DAYS).openapi({ description: "A user coupon expires this many days after issue" }),
    shards: z
      .number()
      .int()
      .min(1)
      .max(MAX_SHARDS)
      .default(1)
      .openapi({ description: "Gate objects serving it (1..64, fixed at creation), for drops larger than one object takes" }),
  })
  .superRefine((body, ctx) => {
    if (body.discountType === "PERCENT" && body.discountValue > 100) {
      ctx.addIssue({ code: "custom", path: ["discountValue"], message: "A PERCENT discount is 1..100" });
    }
    if (body.discountType === "FIXED" && body.maxDiscountAmount !== undefined) {
      ctx.addIssue({ code: "custom", path: ["maxDiscountAmount"], message: "Only a PERCENT coupon takes a maxDiscountAmount" });
    }
    if (body.issueStartsAt && body.issueEndsAt && Date.parse(body.issueEndsAt) <= Date.parse(body.issueStartsAt)) {
      ctx.addIssue({ code: "custom", path: ["issueEndsAt"], message: "Must be after issueStartsAt" });
    }
  })
  .openapi("CreateCoupon");

export type CreateCoupon = z.infer<typeof CreateCouponBody>;

export const CouponSchema = z
  .object({
    id: z.number().int(),
    name: z.string(),
    discountType: DiscountType,
    discountValue: z.number().int(),
    minOrderAmount: z.number().int(),
    maxDiscountAmount: z.number().int().nullable().openapi({ description: "PERCENT only: the most it takes off, in won; null: no cap" }),
    totalQuantity: z.number().int(),
    issuedCount: z.number().int(),
    issueStartsAt: Timestamp.nullable(),
    issueEndsAt: Timestamp.nullable(),
    validDays: z.number().int(),
    shards: z.number().int(),
    createdAt: Timestamp,
  })
  .openapi("Coupon");

export type Coupon = z.infer<typeof CouponSchema>;

export const UserCouponSchema = z
  .object({
    id: z.number().int(),
    couponId: z.number().int(),
    userId: z.number().int(),
    name: z.string(),
    discountType: DiscountType,
    discountValue: z.number().int(),
    minOrderAmount: z.number().int(),
    maxDiscountAmount: z.number().int().nullable().openapi({ description: "PERCENT only: the most it takes off, in won; null: no cap" }),
    status: z.enum(["AVAILABLE", "USED", "EXPIRED"]),
    issuedAt: Timestamp,
    expiresAt: Timestamp,
    usedAt: Timestamp.nullable(),
  })
  .openapi("UserCoupon");

export type UserCoupon = z.infer<typeof UserCouponSchema>;

export const CouponParams = z.object({ couponId: Id });

export const IssueBody = z
  .strictObject({
    userId: PositiveId.optional().openapi({ description: "Defaults to the caller; required for an admin" }),
  })
  .openapi("IssueCouponRequest");

export const UserCouponsQuery = z.object({
  userId: Id.optional().openapi({ description: "Whose coupons; required for an admin, the caller's own for a user" }),
});
