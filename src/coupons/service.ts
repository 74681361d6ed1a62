import { and, desc, eq, gt } from "drizzle-orm";
import { coupons, userCoupons } from "../db/schema";
import { AppError } from "../lib/errors";
import { describeError, log } from "../lib/log";
import { SoldOutMarks } from "../lib/sold-out-marks";
import type { Clock } from "../lib/clock";
import type { Db } from "../env";
import type { CouponGate, IssueOutcome, IssueRefusal } from "./coupon-gate";
import type { Coupon, CreateCoupon, UserCoupon } from "./schemas";
import { gateName, shardOf } from "./shards";

type CouponRow = typeof coupons.$inferSelect;

const toCoupon = (c: CouponRow): Coupon => ({
  id: c.id,
  name: c.name,
  discountType: c.discountType,
  discountValue: c.discountValue,
  minOrderAmount: c.minOrderAmount,
  maxDiscountAmount: c.maxDiscountAmount,
  totalQuantity: c.totalQuantity,
  issuedCount: c.issuedCount,
  issueStartsAt: c.issueStartsAt,
  issueEndsAt: c.issueEndsAt,
  validDays: c.validDays,
  shards: c.shards,
  createdAt: c.createdAt,
});

export async function createCoupon(db: Db, clock: Clock, input: CreateCoupon): Promise<Coupon> {
  const [row] = await db
    .insert(coupons)
    .values({
      name: input.name,
      discountType: input.discountType,
      discountValue: input.discountValue,
      minOrderAmount: input.minOrderAmount,
      maxDiscountAmount: input.maxDiscountAmount ?? null,
      totalQuantity: input.totalQuantity,
      issuedCount: 0,
      issueStartsAt: input.issueStartsAt ?? null,
      issueEndsAt: input.issueEndsAt ?? null,
      validDays: input.validDays,
      shards: input.shards,
      createdAt: clock.now().toISOString(),
    })
    .returning();
  return toCoupon(row!);
}

/** The coupon as D1 has it: `issuedCount` counts committed issues only, of every shard (each batch bumps it). */
export async function getCoupon(db: Db, couponId: number): Promise<Coupon> {
  const row = await db.query.coupons.findFirst({ where: eq(coupons.id, couponId) });
  if (!row) throw new AppError("COUPON_NOT_FOUND", `Coupon ${couponId} does not exist`);
  return toCoupon(row);
}

const UNCONFIRMED = "The issue could not be confirmed; try again (a retry never issues twice)";

/**
 * Per isolate: each coupon's shard count (fixed at creation: learnt once, from the gate that a request with
 * the wrong count reaches), and until when a coupon is known sold out. A coupon not in the first
 * map is routed as one shard, which is right for most and reaches shard 0 of the others.
 */
const shardCounts = new Map<number, number>();
/** How long a sold-out answer is repeated without asking a gate: a piece that comes back waits this long at most. */
export const SOLD_OUT_MARK_MS = 1_000;
const soldOut = new SoldOutMarks(
  SOLD_OUT_MARK_MS,
  (couponId) => new AppError("COUPON_SOLD_OUT", refusalDetail("COUPON_SOLD_OUT", couponId, 0)),
);

/** First come, first served: the user's shard of the coupon decides, and answers once D1 has the row. */
export async function issueCoupon(
  gates: DurableObjectNamespace<CouponGate>,
  clock: Clock,
  couponId: number,
  userId: number,
): Promise<UserCoupon> {
  const markedSoldOut = soldOut.refusal(couponId);
  if (markedSoldOut) throw markedSoldOut;
  const now = clock.now().toISOString();
  let shards = shardCounts.get(couponId) ?? 1;
  let outcome = await askGate(gates, { couponId, userId, now, shards, shard: shardOf(userId, shards) });
  if (!outcome.ok && outcome.code === "MISROUTED") {
    shards = outcome.shards;
    shardCounts.set(couponId, shards);
    outcome = await askGate(gates, { couponId, userId, now, shards, shard: shardOf(userId, shards) });
  }
  if (outcome.ok) return outcome.userCoupon;
  if (outcome.code === "MISROUTED") throw new AppError("SERVICE_UNAVAILABLE", UNCONFIRMED);
  // A gate says sold out only once every piece is issued or held (every shard dry); a failed batch, which
  // this isolate hears of as USER_NOT_FOUND or 503, may give pieces back and reopens the coupon here.
  if (outcome.code === "COUPON_SOLD_OUT") soldOut.mark(couponId);
  if (outcome.code === "USER_NOT_FOUND" || outcome.code === "SERVICE_UNAVAILABLE") soldOut.forget(couponId);
  throw new AppError(outcome.code, refusalDetail(outcome.code, couponId, userId));
}

async function askGate(
  gates: DurableObjectNamespace<CouponGate>,
  request: { couponId: number; userId: number; now: string; shards: number; shard: number },
): Promise<IssueOutcome> {
  try {
    return await gates.getByName(gateName(request.couponId, request.shard)).issue(request);
  } catch (error) {
    // The object was reset or unreachable; whether it issued is unknown, and retrying is safe
    // (the retry gets the coupon or COUPON_ALREADY_ISSUED).
    log("error", "coupon gate call failed", { couponId: request.couponId, userId: request.userId, ...describeError(error) });
    throw new AppError("SERVICE_UNAVAILABLE", UNCONFIRMED);
  }
}

function refusalDetail(code: IssueRefusal, couponId: number, userId: number): string {
  switch (code) {
    case "COUPON_NOT_FOUND":
      return `Coupon ${couponId} does not exist`;
    case "COUPON_NOT_ISSUABLE":
      return `Coupon ${couponId} is outside its issue window`;
    case "COUPON_ALREADY_ISSUED":
      return `User ${userId} already holds coupon ${couponId}`;
    case "COUPON_SOLD_OUT":
      return `Coupon ${couponId} has no pieces left`;
    case "USER_NOT_FOUND":
      return `User ${userId} does not exist`;
    case "SERVICE_UNAVAILABLE":
      return UNCONFIRMED;
  }
}

/** The user's coupons that can still be used: AVAILABLE and not yet expired, newest issue first. */
export async function listUsableCoupons(db: Db, clock: Clock, userId: number): Promise<UserCoupon[]> {
  const now = clock.now().toISOString();
  return db
    .select({
      id: userCoupons.id,
      couponId: userCoupons.couponId,
      userId: userCoupons.userId,
      name: coupons.name,
      discountType: coupons.discountType,
      discountValue: coupons.discountValue,
      minOrderAmount: coupons.minOrderAmount,
      maxDiscountAmount: coupons.maxDiscountAmount,
      status: userCoupons.status,
      issuedAt: userCoupons.issuedAt,
      expiresAt: userCoupons.expiresAt,
      usedAt: userCoupons.usedAt,
    })
    .from(userCoupons)
    .innerJoin(coupons, eq(coupons.id, userCoupons.couponId))
    .where(and(eq(userCoupons.userId, userId), eq(userCoupons.status, "AVAILABLE"), gt(userCoupons.expiresAt, now)))
    .orderBy(desc(userCoupons.issuedAt), desc(userCoupons.id));
}
