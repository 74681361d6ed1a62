import { and, desc, eq, gt } from "drizzle-orm";
import { coupons, userCoupons } from "../db/schema";
import { AppError } from "../lib/errors";
import { describeError, log } from "../lib/log";
import type { Clock } from "../lib/clock";
import type { Db } from "../env";
import type { CouponGate, IssueRefusal } from "./coupon-gate";
import type { Coupon, CreateCoupon, UserCoupon } from "./schemas";

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
      createdAt: clock.now().toISOString(),
    })
    .returning();
  return toCoupon(row!);
}

/** The coupon as D1 has it: `issuedCount` counts committed issues only. */
export async function getCoupon(db: Db, couponId: number): Promise<Coupon> {
  const row = await db.query.coupons.findFirst({ where: eq(coupons.id, couponId) });
  if (!row) throw new AppError("COUPON_NOT_FOUND", `Coupon ${couponId} does not exist`);
  return toCoupon(row);
}

const UNCONFIRMED = "The issue could not be confirmed; try again (a retry never issues twice)";

/** First come, first served: the coupon's own object decides, and answers once D1 has the row. */
export async function issueCoupon(
  gates: DurableObjectNamespace<CouponGate>,
  clock: Clock,
  couponId: number,
  userId: number,
): Promise<UserCoupon> {
  let outcome;
  try {
    outcome = await gates.getByName(String(couponId)).issue({ couponId, userId, now: clock.now().toISOString() });
  } catch (error) {
    // The object was reset or unreachable; whether it issued is unknown, and retrying is safe
    // (the retry gets the coupon or COUPON_ALREADY_ISSUED).
    log("error", "coupon gate call failed", { couponId, userId, ...describeError(error) });
    throw new AppError("SERVICE_UNAVAILABLE", UNCONFIRMED);
  }
  if (!outcome.ok) throw new AppError(outcome.code, refusalDetail(outcome.code, couponId, userId));
  return outcome.userCoupon;
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
