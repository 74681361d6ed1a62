import { adminToken, call, tokenFor } from "./api";

let serial = 0;
const unique = (prefix: string) => `${prefix}-${++serial}-${crypto.randomUUID().slice(0, 8)}`;

export async function makeUser(name = unique("user")): Promise<{ id: number; name: string; balance: number }> {
  const res = await call("POST", "/api/admin/users", { token: await adminToken(), body: { name } });
  if (res.status !== 201) throw new Error(`makeUser failed: ${res.status} ${res.text}`);
  return res.body;
}

export interface ProductFields {
  name?: string;
  price?: number;
  stock?: number;
  /** Left out of the body unless given; null is sent as null (no limit). */
  maxPerUser?: number | null;
}

export interface Product {
  id: number;
  name: string;
  price: number;
  stock: number;
  maxPerUser: number | null;
  createdAt: string;
  updatedAt: string;
}

/** Creates a product as an admin (price 1,000 won, stock 10, no limit unless told otherwise). */
export async function makeProduct(fields: ProductFields = {}): Promise<Product> {
  const body = {
    name: fields.name ?? unique("product"),
    price: fields.price ?? 1000,
    stock: fields.stock ?? 10,
    ...(fields.maxPerUser !== undefined && { maxPerUser: fields.maxPerUser }),
  };
  const res = await call("POST", "/api/admin/products", { token: await adminToken(), body });
  if (res.status !== 201) throw new Error(`makeProduct failed: ${res.status} ${res.text}`);
  return res.body;
}

/** Charges a user's wallet as an admin; returns `{ userId, balance, transaction }`. */
export async function chargeUser(
  userId: number,
  amount: number,
): Promise<{ userId: number; balance: number; transaction: { id: number; balanceAfter: number; createdAt: string } }> {
  const res = await call("POST", "/api/balance/charge", { token: await adminToken(), body: { userId, amount } });
  if (res.status !== 200) throw new Error(`chargeUser failed: ${res.status} ${res.text}`);
  return res.body;
}

export interface CouponFields {
  name?: string;
  discountType?: "FIXED" | "PERCENT";
  discountValue?: number;
  totalQuantity?: number;
  minOrderAmount?: number;
  maxDiscountAmount?: number;
  issueStartsAt?: string;
  issueEndsAt?: string;
  validDays?: number;
}

/** Creates a coupon as an admin (FIXED 1,000 won, 10 pieces, 30 days unless told otherwise). */
export async function makeCoupon(fields: CouponFields = {}): Promise<{ id: number; [field: string]: any }> {
  const body = { name: unique("coupon"), discountType: "FIXED", discountValue: 1000, totalQuantity: 10, validDays: 30, ...fields };
  const res = await call("POST", "/api/admin/coupons", { token: await adminToken(), body });
  if (res.status !== 201) throw new Error(`makeCoupon failed: ${res.status} ${res.text}`);
  return res.body;
}

/** Issues a coupon to a user (as that user); returns the user coupon. */
export async function issueCoupon(couponId: number, userId: number): Promise<{ id: number; [field: string]: any }> {
  const res = await call("POST", `/api/coupons/${couponId}/issue`, { token: await tokenFor(userId), body: {} });
  if (res.status !== 200) throw new Error(`issueCoupon failed: ${res.status} ${res.text}`);
  return res.body;
}
